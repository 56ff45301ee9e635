"""The M-Score: prompt sets, detectors behind one interface, and scoring."""
