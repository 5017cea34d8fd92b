"""Admission and flow control: saturation detectors, sheddable requests, and the queue behind the `flowControl` gate."""
