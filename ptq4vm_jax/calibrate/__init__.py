"""Block-wise calibration (PTS initialisation + JLSS) and its resume state."""
