"""The networks: ConMIM (student, teacher, projectors, loss, EMA) and the pixel-regression baseline."""
