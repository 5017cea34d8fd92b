"""`epp-chaos`: faults on a schedule under load, every profile side by side."""
