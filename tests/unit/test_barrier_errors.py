"""PersonDeleted crosses process boundaries (a GPU worker raises it, the coordinator must recognise it)."""

from __future__ import annotations

import pickle

from storage.barrier import PersonDeleted
from storage.keys import PersonRef


def test_person_deleted_survives_pickling_with_its_person_and_message():
    raised = PersonDeleted(PersonRef("acme", "b1", "ada"), "train stage")
    again = pickle.loads(pickle.dumps(raised))
    assert isinstance(again, PersonDeleted)
    assert again.person == raised.person and str(again) == str(raised) and "train stage" in str(again)
