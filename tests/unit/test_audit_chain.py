"""The audit chain, pure: canonical form, links, checkpoints and the walk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from libs import audit_chain as ac

T0 = datetime(2026, 12, 6, 12, 0, 0, 123456, tzinfo=UTC)


def row(i: int, **changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": i,
        "time": T0 + timedelta(seconds=i),
        "recorded_at": T0 + timedelta(seconds=i, milliseconds=5),
        "actor": "user:alice",
        "action": "command.sent",
        "device_id": "lamp",
        "target": "command:c1",
        "result": "pending",
        "reason": None,
        "correlation_id": "corr",
        "cause_id": None,
        "detail": {"b": 1, "a": [1, 2.5, "é"]},
        "home": "home",
        "stream": "COMMANDS",
        "source_seq": i,
    }
    return base | changes


def chain(n: int, start: str = ac.GENESIS) -> list[dict[str, object]]:
    rows, previous = [], start
    for i in range(1, n + 1):
        r = row(i)
        previous = r["hash"] = ac.link(previous, r)
        rows.append(r)
    return rows


def test_the_canonical_form_ignores_key_order_zones_and_tuples() -> None:
    a = row(1)
    elsewhere = (T0 + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=2)))
    b = row(1, detail={"a": (1, 2.5, "é"), "b": 1}, time=elsewhere)
    assert ac.canonical(a) == ac.canonical(b)
    # As the JSON column gives a detail back: keys as text.
    assert ac.canonical(row(1, detail={1: "x"})) == ac.canonical(row(1, detail={"1": "x"}))
    assert b'"2026-12-06T12:00:01.123456Z"' in ac.canonical(a)


@pytest.mark.parametrize(
    "field, value",
    [
        ("actor", "user:mallory"),
        ("result", "done"),
        ("detail", {"b": 2}),
        ("id", 9),
        ("reason", "x"),
    ],
)
def test_any_change_of_a_covered_field_changes_the_hash(field: str, value: object) -> None:
    assert ac.link(ac.GENESIS, row(1)) != ac.link(ac.GENESIS, row(1, **{field: value}))


def test_the_hash_depends_on_the_row_before() -> None:
    assert ac.link(ac.GENESIS, row(1)) != ac.link("f" * 64, row(1))


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="zone-aware"):
        ac.canonical(row(1, time=datetime(2026, 1, 1)))


def test_an_intact_chain_walks_to_the_end() -> None:
    walk = ac.Walk()
    assert all(walk.feed(r) for r in chain(5))
    assert (walk.checked, walk.first_bad) == (5, None)


def test_an_edited_row_is_named() -> None:
    rows = chain(5)
    rows[2]["result"] = "done"
    walk = ac.Walk()
    for r in rows:
        walk.feed(r)
    assert walk.first_bad is not None and walk.first_bad.id == 3
    assert walk.checked == 3


def test_an_edited_and_rehashed_row_breaks_the_next_link() -> None:
    rows = chain(5)
    rows[2]["result"] = "done"
    rows[2]["hash"] = ac.link(str(rows[1]["hash"]), rows[2])
    walk = ac.Walk()
    for r in rows:
        walk.feed(r)
    assert walk.first_bad is not None and walk.first_bad.id == 4


def test_a_deleted_row_is_named_by_the_one_after_it() -> None:
    rows = chain(5)
    del rows[1]
    walk = ac.Walk()
    for r in rows:
        walk.feed(r)
    assert walk.first_bad is not None and walk.first_bad.id == 3


def test_a_row_without_a_hash_is_named() -> None:
    rows = chain(2)
    rows[1]["hash"] = None
    walk = ac.Walk()
    for r in rows:
        walk.feed(r)
    assert walk.first_bad == ac.Bad(2, walk.first_bad.reason) and "no hash" in walk.first_bad.reason


def test_after_a_checkpoint_the_chain_starts_from_its_hash() -> None:
    rows = chain(6)
    cut = rows[2]
    walk = ac.Walk(str(cut["hash"]), int(cut["id"]))  # type: ignore[call-overload]
    assert all(walk.feed(r) for r in rows[3:])
    assert walk.checked == 3


def test_a_checkpoint_is_signed_with_the_key_and_nothing_else_passes() -> None:
    key = ac.checkpoint_key("s" * 40)
    signature = ac.sign_checkpoint(key, 3, "a" * 64, T0)
    assert ac.checkpoint_signed(key, 3, "a" * 64, T0, signature)
    assert not ac.checkpoint_signed(key, 4, "a" * 64, T0, signature)
    assert not ac.checkpoint_signed(key, 3, "b" * 64, T0, signature)
    assert not ac.checkpoint_signed(ac.checkpoint_key("t" * 40), 3, "a" * 64, T0, signature)


@pytest.mark.parametrize(
    "actor, principal",
    [
        ("user:alice", (ac.ActorKind.USER, "alice")),
        ("apikey:k-1", (ac.ActorKind.API_KEY, "k-1")),
        ("device:lamp", (ac.ActorKind.DEVICE, "lamp")),
        ("rule:r1", (ac.ActorKind.RULE, "r1")),
        ("platform:actors", (ac.ActorKind.SERVICE, "actors")),
        ("metrics:x", (ac.ActorKind.SERVICE, "metrics:x")),
        ("tests", (ac.ActorKind.SERVICE, "tests")),
    ],
)
def test_every_actor_names_a_principal(actor: str, principal: tuple[ac.ActorKind, str]) -> None:
    assert ac.principal_of(actor) == principal
