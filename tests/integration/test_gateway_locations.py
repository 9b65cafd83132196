"""Homes, floors and rooms over HTTP, and what they mean for the devices placed in them."""

from __future__ import annotations

import pytest
from litestar.testing import AsyncTestClient

from libs import messages as m
from libs import subjects
from tests.factories import define_location
from tests.helpers import eventually, unique_id
from tests.integration.test_rules import collected

LOCATIONS = "/api/v1/locations"
DEVICES = "/api/v1/devices"


async def test_a_home_its_floors_and_rooms_have_paths_and_list_in_path_order(
    client: AsyncTestClient,
) -> None:
    home = await define_location(client, "home")
    ground = await define_location(client, "floor", home["id"])
    kitchen = await define_location(client, "room", ground["id"])
    garage = await define_location(client, "room", home["id"])  # a room may skip the floor

    assert kitchen["path"] == f"{home['id']}/{ground['id']}/{kitchen['id']}"
    assert garage["path"] == f"{home['id']}/{garage['id']}"
    assert (await client.get(f"{LOCATIONS}/{kitchen['id']}")).json() == kitchen
    everything = (await client.get(LOCATIONS, params={"limit": 500})).json()["items"]
    mine = [loc["id"] for loc in everything if loc["path"].startswith(home["id"])]
    # Path order: a home, then what is in it (ids `floor-…` sort before `room-…`).
    assert mine == [home["id"], ground["id"], kitchen["id"], garage["id"]]
    rooms = (await client.get(LOCATIONS, params={"parent_id": home["id"], "kind": "room"})).json()
    assert [loc["id"] for loc in rooms["items"]] == [garage["id"]]


async def test_locations_page_by_cursor_without_gaps(client: AsyncTestClient) -> None:
    home = await define_location(client, "home")
    floors = [await define_location(client, "floor", home["id"]) for _ in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"parent_id": home["id"], "limit": 2} | ({"cursor": cursor} if cursor else {})
        body = (await client.get(LOCATIONS, params=params)).json()
        seen += [loc["id"] for loc in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(f["id"] for f in floors)


@pytest.mark.parametrize(
    ("kind", "parent", "reason"),
    [
        ("floor", None, "a floor needs a parent_id (home)"),
        ("room", "missing", "no location 'missing'"),
        ("home", "home", "a home is not inside another location"),
        ("floor", "floor", "a floor goes in a home, not in a floor"),
    ],
)
async def test_a_location_in_the_wrong_place_is_refused_naming_parent_id(
    client: AsyncTestClient, kind: str, parent: str | None, reason: str
) -> None:
    home = await define_location(client, "home")
    floor = await define_location(client, "floor", home["id"])
    parent_id = {"home": home["id"], "floor": floor["id"]}.get(parent or "", parent)
    body = {"name": "X", "kind": kind} | ({"parent_id": parent_id} if parent_id else {})

    refused = await client.post(LOCATIONS, json=body)

    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"] == [{"field": "$.parent_id", "message": reason}]


async def test_bad_bodies_and_duplicates_are_refused(client: AsyncTestClient) -> None:
    home = await define_location(client, "home")
    again = await client.post(LOCATIONS, json={"id": home["id"], "name": "H", "kind": "home"})
    assert again.status_code == 409
    assert again.json()["errors"][0]["field"] == "$.id"
    castle = await client.post(LOCATIONS, json={"name": "C", "kind": "castle"})
    assert castle.status_code == 422
    assert castle.json()["errors"][0]["field"] == "$.kind"
    slash = await client.post(LOCATIONS, json={"id": "a/b", "name": "S", "kind": "home"})
    assert slash.status_code == 422
    assert slash.json()["errors"][0]["field"] == "$.id"
    assert (await client.get(f"{LOCATIONS}/{unique_id()}")).status_code == 404


async def test_once_a_home_is_defined_its_devices_must_be_in_one_of_its_locations(
    client: AsyncTestClient,
) -> None:
    home = await define_location(client, "home")
    kitchen = await define_location(client, "room", home["id"])

    placed = await client.post(
        DEVICES, json={"name": "Lamp", "kind": "light", "location": kitchen["path"]}
    )
    typo = await client.post(
        DEVICES, json={"name": "Lamp", "kind": "light", "location": f"{home['id']}/kitchn"}
    )
    moved = await client.patch(
        f"{DEVICES}/{placed.json()['id']}", json={"location": f"{home['id']}/attic"}
    )
    elsewhere = await client.post(
        DEVICES, json={"name": "Lamp", "kind": "light", "location": f"{unique_id()}/shed"}
    )

    assert placed.status_code == 201, placed.text
    assert typo.status_code == 422
    assert typo.json()["errors"][0]["field"] == "$.location"
    assert kitchen["path"] in typo.json()["detail"]  # it says which locations the home has
    assert moved.status_code == 422
    assert elsewhere.status_code == 201  # an undefined home: a free path, as before


async def test_only_an_empty_location_can_be_deleted(client: AsyncTestClient) -> None:
    home = await define_location(client, "home")
    room = await define_location(client, "room", home["id"])
    device = (
        await client.post(DEVICES, json={"name": "L", "kind": "light", "location": room["path"]})
    ).json()

    holds_room = await client.delete(f"{LOCATIONS}/{home['id']}")
    holds_device = await client.delete(f"{LOCATIONS}/{room['id']}")
    await client.delete(f"{DEVICES}/{device['id']}")
    emptied = await client.delete(f"{LOCATIONS}/{room['id']}")

    assert holds_room.status_code == 409
    assert "holds 1 location(s)" in holds_room.json()["detail"]
    assert holds_device.status_code == 409
    assert "1 device(s)" in holds_device.json()["detail"]
    assert emptied.status_code == 204
    assert (await client.get(f"{LOCATIONS}/{room['id']}")).status_code == 404


async def test_every_change_is_a_fact_on_the_bus_for_the_audit(client: AsyncTestClient, js) -> None:  # type: ignore[no-untyped-def]
    home = await define_location(client, "home")
    renamed = await client.patch(f"{LOCATIONS}/{home['id']}", json={"name": "Cottage"})
    await client.delete(f"{LOCATIONS}/{home['id']}")

    async def three_facts() -> list[m.ChangeFact]:
        # Published by the outbox's relay after each commit: a moment after the answer.
        facts = await collected(js, subjects.location_changed(home["id"]), m.change_fact_decoder)
        assert len(facts) == 3, facts
        return facts

    facts = await eventually(three_facts, timeout=5)
    assert renamed.json()["name"] == "Cottage"
    assert [(f.what, f.change, f.detail["name"]) for f in facts] == [
        ("location", "created", "The home"),
        ("location", "updated", "Cottage"),
        ("location", "deleted", "Cottage"),
    ]
    assert {f.actor for f in facts} == {(await client.get("/api/v1/me")).json()["actor"]}
