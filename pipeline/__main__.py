"""``python -m pipeline`` runs the command line."""

from pipeline.cli.main import run

if __name__ == "__main__":
    run()
