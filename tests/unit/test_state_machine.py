"""The person and batch state machines (storage/state.py): the table of allowed moves (issue #13). That
every save refuses a move the table does not allow is tested against the real S3 server, in
tests/integration/test_state_transitions.py."""

from __future__ import annotations

import json

import pytest

from storage.state import (BATCH_STATES, BATCH_TRANSITIONS, FINAL_PERSON_STATES, INITIAL_BATCH_STATES,
                           INITIAL_PERSON_STATES, OPEN_BATCH_STATES, PERSON_STATES, PERSON_TRANSITIONS,
                           RETRYABLE_PERSON_STATES, BatchStatus, ForbiddenTransition, PersonStatus,
                           check_batch_transition, check_person_transition)

P, B = PersonStatus, BatchStatus

# Every move a writer makes besides saving a state again and deleting, spelled out once more by hand:
# a change to the table has to change this list too.
PERSON_MOVES = {
    (P.QUEUED, P.INGESTING), (P.INGESTING, P.TRAINING), (P.TRAINING, P.GENERATING),
    (P.GENERATING, P.PACKAGING), (P.PACKAGING, P.DONE),  # the coordinator's stages
    (P.INGESTING, P.NEEDS_PHOTOS), (P.QUEUED, P.NEEDS_PHOTOS),  # too few usable photos (ingest, start)
    *((stage, P.FAILED) for stage in (P.INGESTING, P.TRAINING, P.GENERATING, P.PACKAGING)),
    *((state, P.CANCELLED) for state in (P.QUEUED, P.INGESTING, P.TRAINING, P.GENERATING, P.PACKAGING)),
    (P.NEEDS_PHOTOS, P.QUEUED), (P.FAILED, P.QUEUED), (P.CANCELLED, P.QUEUED),  # retry
    (P.DONE, P.GENERATING),  # more headshots
}
BATCH_MOVES = {(B.CREATED, B.RUNNING), (B.CREATED, B.CANCELLED), (B.RUNNING, B.DONE), (B.RUNNING, B.CANCELLED),
               (B.DONE, B.RUNNING), (B.CANCELLED, B.RUNNING)}


def _expected(moves, states, deleted):
    allowed = set(moves) | {(state, state) for state in states}
    allowed |= {(state, deleted) for state in states}
    return allowed


def test_the_enums_store_the_same_strings_as_before():
    assert [str(s) for s in PersonStatus] == ["queued", "ingesting", "training", "generating", "packaging", "done",
                                             "needs_photos", "failed", "cancelled", "deleted"]
    assert [str(s) for s in BatchStatus] == ["created", "running", "done", "cancelled", "deleted"]
    assert PERSON_STATES == tuple(PersonStatus) and BATCH_STATES == tuple(BatchStatus)
    assert json.dumps({"state": P.NEEDS_PHOTOS}) == '{"state": "needs_photos"}'
    assert FINAL_PERSON_STATES == {P.DONE, P.NEEDS_PHOTOS, P.FAILED, P.CANCELLED, P.DELETED}
    assert set(RETRYABLE_PERSON_STATES) == {P.NEEDS_PHOTOS, P.FAILED, P.CANCELLED}
    assert OPEN_BATCH_STATES == {B.CREATED, B.RUNNING}


@pytest.mark.parametrize("kind", ["person", "batch"])
def test_the_table_allows_exactly_the_moves_writers_make(kind):
    status, table, moves = (PersonStatus, PERSON_TRANSITIONS, PERSON_MOVES) if kind == "person" else \
        (BatchStatus, BATCH_TRANSITIONS, BATCH_MOVES)
    check = check_person_transition if kind == "person" else check_batch_transition
    expected = _expected(moves, list(status), status.DELETED)
    assert set(table) == set(status)
    for source in status:
        for target in status:
            if (source, target) in expected:
                assert check(f"{kind} t/b", source, target) == target
            else:
                with pytest.raises(ForbiddenTransition) as refused:
                    check(f"{kind} t/b", source, target)
                assert (refused.value.from_state, refused.value.to_state) == (source, target)
                assert target not in refused.value.allowed


def test_deleted_is_the_end_and_every_state_can_be_deleted():
    for status, table in ((PersonStatus, PERSON_TRANSITIONS), (BatchStatus, BATCH_TRANSITIONS)):
        assert table[status.DELETED] == {status.DELETED}
        assert all(status.DELETED in table[state] for state in status)


def test_new_documents_start_only_in_initial_states():
    assert INITIAL_PERSON_STATES == {P.QUEUED, P.NEEDS_PHOTOS}
    assert INITIAL_BATCH_STATES == {B.CREATED, B.RUNNING}
    with pytest.raises(ForbiddenTransition, match=r"person t/b/p is a new document and may start only in "
                                                  r"queued, needs_photos, but its state is done"):
        check_person_transition("person t/b/p", None, "done")
    with pytest.raises(ForbiddenTransition, match="may start only in created, running, but its state is done"):
        check_batch_transition("batch t/b", None, "done")


def test_the_error_names_the_document_both_states_and_what_is_allowed():
    with pytest.raises(ForbiddenTransition) as refused:
        check_person_transition("person t/b/ada", "done", "queued")
    assert str(refused.value) == ("person t/b/ada cannot go from done to queued; from done it may be saved as "
                                  "generating, done, deleted")
    assert isinstance(refused.value, ValueError)
    with pytest.raises(ValueError, match=r"state of batch t/b must be one of created, running, done, cancelled, "
                                         r"deleted but is 'finished'"):
        check_batch_transition("batch t/b", "running", "finished")
