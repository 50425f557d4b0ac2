"""``cbct-to-sct``: a synthetic CT in HU from a cone-beam CT, with metrics against a planning CT."""
