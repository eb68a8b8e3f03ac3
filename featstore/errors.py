"""User-facing errors: one line that names the file or argument at fault and the fix."""


class FeatstoreError(Exception):
    """An error the user can fix; the CLI prints its message as one line and exits non-zero."""


class DatasetError(FeatstoreError):
    """The input dataset is malformed; raised before anything is written."""


class BackboneError(FeatstoreError):
    """Unknown backbone, bad layer selection, or weights that cannot be loaded."""


class StoreError(FeatstoreError):
    """The artifact store cannot be read or written, or an artifact failed verification."""


class BudgetError(FeatstoreError):
    """A model's parameter count exceeds the budget."""
