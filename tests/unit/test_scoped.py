import pytest

from storage.keys import PersonRef
from storage.scoped import PersonScope, ScopeViolation


class _NoStore:
    """Anything reaching the store would be a breach: the scope must refuse before that."""

    def __getattr__(self, name):
        raise AssertionError(f"the store was called ({name}) for a key outside the scope")


@pytest.mark.parametrize("key", [
    "acme/b1/bob/uploads/000.jpg",          # another person of the same batch
    "acme/b2/ada/uploads/000.jpg",          # the same person id in another batch
    "other/b1/ada/uploads/000.jpg",         # another tenant
    "acme/b1/ada/../bob/uploads/000.jpg",   # traversal
    "acme/b1/ada//uploads/000.jpg",
    "acme/b1/ada-x/uploads/000.jpg",        # a longer id sharing the prefix text
])
def test_scope_refuses_keys_of_anyone_else(key):
    scope = PersonScope(_NoStore(), PersonRef("acme", "b1", "ada"))
    with pytest.raises(ScopeViolation, match="outside person 'ada'"):
        scope.get("uploads", key)
    with pytest.raises(ScopeViolation):
        scope.put("derived", key, b"x")
