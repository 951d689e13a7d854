"""The fault-injecting Stripe proxy, for tests (the implementation is product code: the
simulator uses it too). Kept as a module so ``from faultproxy import FaultProxy`` works."""

from billing_dev.faults import FAULTS, FaultProxy

__all__ = ["FAULTS", "FaultProxy"]
