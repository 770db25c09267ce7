"""Photos in: sources, the demo, formats, the canvas, files and refusals."""
