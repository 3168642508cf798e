"""Pure analyses: arrays in, arrays/dataclasses out. No Ray, no plotting, no store I/O."""
