"""paramserver/dedupe.py alone: a resent push is applied at most once.

What a user relies on: the very same push (rank, session, request id) is recognised,
also when it came in several messages, and its answer's fields kept; a push of another
session (a restarted worker) or another request is not taken for it; the table survives
a checkpoint, so a restarted server still recognises a push it applied before.
"""
from paramserver.dedupe import Applied


def test_the_same_push_is_recognised_and_counted():
    a = Applied()
    a.record(2, session=7, rid=31, step=4, version=5, meta={"loss": 1.5})
    rec = a.find(2, 7, 31)
    assert rec["version"] == 5 and rec["meta"] == {"loss": 1.5} and rec["step"] == 4
    assert a.repeats == 1


def test_another_session_or_request_or_rank_is_a_new_push():
    a = Applied()
    a.record(2, session=7, rid=31, step=4, version=5, meta={})
    assert a.find(2, 8, 31) is None                 # the worker was restarted: a new incarnation
    assert a.find(2, 7, 32) is None                 # its next request
    assert a.find(1, 7, 31) is None
    assert a.repeats == 0


def test_a_push_in_several_messages_is_recognised_by_any_of_them():
    a = Applied()
    a.record(0, session=1, rid=12, step=3, version=4, meta={}, rids=[10, 11, 12])
    assert all(a.find(0, 1, rid) is not None for rid in (10, 11, 12))
    assert a.find(0, 1, 9) is None


def test_only_the_last_push_of_a_worker_is_kept():
    a = Applied()
    a.record(0, session=1, rid=1, step=0, version=1, meta={}, rids=[1, 2])
    a.record(0, session=1, rid=3, step=1, version=2, meta={})
    assert a.find(0, 1, 3)["version"] == 2 and a.find(0, 1, 1) is None and a.find(0, 1, 2) is None


def test_the_table_survives_a_checkpoint():
    a = Applied()
    a.record(0, session=1, rid=5, step=2, version=3, meta={"loss": 0.5}, rids=[4, 5])
    a.record(3, session=9, rid=8, step=2, version=3, meta={})
    restarted = Applied()
    restarted.load(a.state())
    assert restarted.find(0, 1, 4)["meta"] == {"loss": 0.5} and restarted.find(3, 9, 8)["step"] == 2
    assert restarted.state() == a.state()
