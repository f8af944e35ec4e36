"""The one exception type users see: every message names the problem and the fix."""


class LmlabError(Exception):
    """A problem the user can fix (bad path, malformed data, config typo, ...)."""
