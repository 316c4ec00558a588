"""The web console in a real headless Chromium (Debian's, driven by Playwright): live
rows as tasks change over gRPC, the task page's timeline and payload links, cancel from
the page, paging through 10,000 tasks. A screenshot is left in test-artifacts/."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, server_settings, status_update, stub_for
from tests.test_dispatch import listen, next_request
from tests.test_payloads import upload

pytestmark = pytest.mark.anyio

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_FLAGS = [
    # This machine's network is closed: without these, Chromium's own background
    # connections fail by the dozen at every start.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000
expect.set_options(timeout=WAIT_MS)


def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail(
            "the console's tests need Chromium: `make test` installs Debian's (apt-get install"
            " chromium); or set CHROMIUM to a Chromium binary"
        )
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser, server: TaskManagerServer) -> AsyncIterator[Page]:
    opened = await browser.new_page(viewport={"width": 1200, "height": 800})
    opened.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    await opened.goto(server.http_url)
    await expect(opened.locator("body")).to_have_attribute("data-synced", "true")
    yield opened
    await opened.close()
    assert not errors, errors


async def test_a_failed_task_appears_live_and_its_page_shows_the_timeline(
    page: Page, stub: AsyncStub
) -> None:
    created = (await stub.CreateTask(create_request("drone-1", display_name="survey 7"))).task
    row = page.locator(f'tr[data-task-id="{created.version.task_id}"]')
    await expect(row).to_contain_text("SENT")  # no reload: from the watch
    await expect(row).to_contain_text("drone-1")

    task = created
    for status in (pb.STATUS_MACHINE_RECEIPT, pb.STATUS_EXECUTING):
        task = (await stub.UpdateStatus(status_update(task, status))).task
    failed = status_update(task, pb.STATUS_DONE_NOT_OK)
    failed.status_update.status.task_error.code = pb.ERROR_CODE_FAILED
    failed.status_update.status.task_error.message = "rotor 3 overheated"
    await stub.UpdateStatus(failed)
    await expect(row).to_contain_text("DONE_NOT_OK")
    await expect(row.locator("td.error")).to_have_text("rotor 3 overheated")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console-tasks.png"))

    await row.get_by_role("link").click()
    await expect(page.locator("#task-title")).to_have_text("survey 7")
    timeline = page.locator("#timeline li")
    await expect(timeline).to_have_count(5)  # CREATED, SENT, receipt, executing, failed
    await expect(timeline.last).to_contain_text("DONE_NOT_OK")
    await expect(timeline.last).to_contain_text("rotor 3 overheated")
    await expect(page.locator("#attempts tbody tr")).to_have_count(1)
    await expect(page.locator("#cancel-task")).to_be_disabled()
    await page.screenshot(path=str(ARTIFACTS / "console-task.png"))


async def test_the_task_page_links_its_inputs_and_outputs_to_their_bytes(
    page: Page, stub: AsyncStub
) -> None:
    mesh, log = b"a mesh of the north field", b"rotor 3: 81 C\n" * 150
    request = create_request("drone-3", display_name="with payloads")
    request.inputs.add(name="mesh.obj", payload=(await upload(stub, mesh)).payload)
    request.inputs.add(name="map", payload=(await upload(stub, b"a map")).payload)
    task = (await stub.CreateTask(request)).task
    task = (await stub.UpdateStatus(status_update(task, pb.STATUS_MACHINE_RECEIPT))).task
    output = pb.AttachOutputRequest(
        task_id=task.version.task_id,
        attempt=1,
        name="rotor.log",
        payload=(await upload(stub, log)).payload,
    )
    await stub.AttachOutput(output)

    await page.locator(f'tr[data-task-id="{task.version.task_id}"] a').click()
    await expect(page.locator("#task-title")).to_have_text("with payloads")
    inputs = page.locator("#inputs li")
    await expect(inputs).to_have_count(2)
    await expect(inputs.first).to_have_text(f"mesh.obj ({len(mesh)} B)")
    await expect(inputs.nth(1)).to_have_text("map (5 B)")
    outputs = page.locator("#attempts td.outputs")
    await expect(outputs).to_have_text("rotor.log (2.1 KiB)")  # 2,100 bytes
    for link, expected in (
        (inputs.first.get_by_role("link"), mesh),
        (inputs.nth(1).get_by_role("link"), b"a map"),
        (outputs.get_by_role("link"), log),
    ):
        await expect(link).to_have_attribute("download", await link.inner_text())
        href = await link.evaluate("a => a.href")  # absolute, as the browser follows it
        fetched = await page.request.get(href)
        assert fetched.status == 200
        assert await fetched.body() == expected


async def test_cancel_from_the_task_page_reaches_the_task(page: Page, stub: AsyncStub) -> None:
    created = (await stub.CreateTask(create_request("drone-2", display_name="to cancel"))).task
    await page.locator(f'tr[data-task-id="{created.version.task_id}"] a').click()
    await expect(page.locator("#task-facts")).to_contain_text("SENT")
    await page.locator("#cancel-task").click()
    await expect(page.locator("#task-facts")).to_contain_text("CANCEL_REQUESTED")
    stored = await stub.GetTask(pb.GetTaskRequest(task_id=created.version.task_id))
    assert stored.task.status.status == pb.STATUS_CANCEL_REQUESTED
    await expect(page.locator("#timeline li").last).to_contain_text("from the console")


async def test_a_change_while_the_listing_is_in_flight_outlives_the_listing(
    page: Page, stub: AsyncStub
) -> None:
    created = (await stub.CreateTask(create_request("drone-3"))).task
    row = page.locator(f'tr[data-task-id="{created.version.task_id}"]')
    await expect(row).to_contain_text("SENT")
    listings = int(await page.locator("body").get_attribute("data-listings") or "0")

    # The next listing reads the task at SENT, and its answer is held back until the
    # watch has brought the task's next change.
    read, release = asyncio.Event(), asyncio.Event()

    async def held_back(route: Route) -> None:
        answer = await route.fetch()
        read.set()
        await release.wait()
        await route.fulfill(response=answer)

    await page.route("**/QueryTasks", held_back)
    await page.get_by_role("button", name="Filter").click()
    await asyncio.wait_for(read.wait(), WAIT_MS / 1000)
    await stub.UpdateStatus(status_update(created, pb.STATUS_MACHINE_RECEIPT))
    await expect(row).to_contain_text("MACHINE_RECEIPT")  # from the watch, over the old rows
    release.set()
    await expect(page.locator("body")).to_have_attribute("data-listings", str(listings + 1))
    await expect(row).to_contain_text("MACHINE_RECEIPT")  # not the listing's SENT


async def test_ten_thousand_tasks_are_paged_not_all_rendered(page: Page, stub: AsyncStub) -> None:
    for batch in range(10):
        tasks = [pb.CreateTaskRequest(display_name=f"bulk {batch}-{n}") for n in range(1000)]
        await stub.SubmitSessions(
            pb.SubmitSessionsRequest(sessions=[pb.SessionSubmission(tasks=tasks)])
        )
    await page.reload()
    rows = page.locator("#tasks tbody tr")
    await expect(rows).to_have_count(50)
    await expect(rows.first).to_contain_text("bulk 0-0")
    await page.locator("#next-page").click()
    await expect(page.locator("#page-label")).to_have_text("page 2")
    await expect(rows.first).to_contain_text("bulk 0-50")
    await expect(rows).to_have_count(50)
    await page.locator("#previous-page").click()
    await expect(rows.first).to_contain_text("bulk 0-0")
    await page.locator("#filter-status").select_option("DONE_OK")
    await page.locator("#filters button").click()
    await expect(rows).to_have_count(0)  # none is done: the filter is applied
    await page.locator("#filter-status").select_option("CREATED")
    await page.locator("#filters button").click()
    await expect(rows).to_have_count(50)


async def test_the_agents_table_shows_who_is_connected(page: Page, stub: AsyncStub) -> None:
    call = listen(stub, "rover-9")
    try:
        await stub.CreateTask(create_request("rover-9"))
        await next_request(call)
        await page.locator("nav a", has_text="Agents").click()
        row = page.locator("#agents tbody tr", has_text="rover-9")
        await expect(row).to_contain_text("CONNECTED")
        await expect(row.locator("td").nth(3)).to_have_text("1")
    finally:
        call.cancel()


async def open_console(browser: Browser, server: TaskManagerServer) -> Page:
    page = await browser.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(server.http_url)
    return page


async def test_the_console_resumes_its_watch_after_the_gateway_restarts(
    browser: Browser, database: str
) -> None:
    server = await TaskManagerServer.start(server_settings(database))
    try:
        page = await open_console(browser, server)
        await expect(page.locator("#live")).to_have_text("live")
        assert server.http is not None
        addresses = {"listen": server.address, "http_listen": server.http.address}
        await server.stop()
        await expect(page.locator("#live")).to_have_text("reconnecting")
        # A task created while the page cannot see: on another server, on other ports.
        elsewhere = await TaskManagerServer.start(server_settings(database))
        try:
            async with grpc.aio.insecure_channel(elsewhere.address) as channel:
                created = (await AsyncStub(channel).CreateTask(create_request("drone-4"))).task
        finally:
            await elsewhere.stop()
        server = await TaskManagerServer.start(server_settings(database, **addresses))
        await expect(page.locator("#live")).to_have_text("live")  # EventSource came back
        # It resumed after its Last-Event-ID: the task, created before it reconnected,
        # arrives as a change. (A watch from now would never show it without a reload.)
        row = page.locator(f'tr[data-task-id="{created.version.task_id}"]')
        await expect(row).to_contain_text("SENT")
    finally:
        await server.stop()


async def test_an_operator_signs_in_once_with_authentication_on(
    browser: Browser, database: str
) -> None:
    credential, token = new_token("ops", Role.OPERATOR, (), time.time_ns())
    add_credential(database, credential)
    server = await TaskManagerServer.start(server_settings(database))
    try:
        page = await open_console(browser, server)
        await expect(page.locator("#problem")).to_contain_text("UNAUTHENTICATED")
        await page.locator("#token").fill(token)
        await page.locator("#sign-in button").click()
        await expect(page.locator("#live")).to_have_text("live")
        await expect(page.locator("#problem")).to_be_hidden()
        metadata = (("authorization", f"Bearer {token}"),)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = AsyncStub(channel)
            created = (await stub.CreateTask(create_request("d-5"), metadata=metadata)).task
        row = page.locator(f'tr[data-task-id="{created.version.task_id}"]')
        await expect(row).to_contain_text("SENT")
        await page.reload()  # the token is kept for the browser session
        await expect(row).to_contain_text("SENT")
        await expect(page.locator("#signed-in")).to_have_text("signed in")

        # A payload link carries the token: a link cannot send an Authorization header.
        async with grpc.aio.insecure_channel(server.address) as channel:
            signed = stub_for(channel, token)
            request = create_request("d-5", display_name="with an input")
            request.inputs.add(name="mesh", payload=(await upload(signed, b"mesh")).payload)
            with_input = (await signed.CreateTask(request)).task
        await page.locator(f'tr[data-task-id="{with_input.version.task_id}"] a').click()
        link = page.locator("#inputs a", has_text="mesh")
        href = await link.evaluate("a => a.href")
        assert f"access_token={token}" in href
        fetched = await page.request.get(href)
        assert (fetched.status, await fetched.body()) == (200, b"mesh")
        refused = await page.request.get(href.partition("?")[0])  # no token: refused
        assert refused.status == 401
    finally:
        await server.stop()
