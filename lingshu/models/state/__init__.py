"""STATE (Arc Institute), trained and run by the ``arc-state`` package; the adapter is ``model``."""
