"""The typed error of a delivery attempt, translated once into the delivery row's state."""

from __future__ import annotations

from models.errors import VoxelgateError


class DeliveryFailed(VoxelgateError):
    """A send to a node did not deliver every instance.

    Attributes:
        retry: Whether another attempt may succeed (peer down, refused association, failure
            statuses); ``False`` for what a resend cannot fix (no DICOM outputs, unknown node).
        sent: Instances the peer confirmed in this attempt before it failed.
    """

    code = "delivery_failed"

    def __init__(self, message: str, *, retry: bool = True, sent: int = 0) -> None:
        super().__init__(message)
        self.retry = retry
        self.sent = sent
