"""Phase diagrams: aggregate runs into grids, classify phases, find boundaries; compute first, draw second."""
