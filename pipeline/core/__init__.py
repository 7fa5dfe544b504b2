"""What every layer leans on: errors, options, atomic files, progress, devices, processes."""
