"""Issue 35, item 6: jedi-app under load, through the real Gradio queue (no browser): a running server takes
concurrent /generate calls from gradio_client, answers bad uploads with one line and stays up, and turns
requests away with the queue-full error once --max-queue requests wait."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers.app_server import running_app
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed: pip install -e '.[app]'")
gradio_client = pytest.importorskip("gradio_client")
MAX_QUEUE = 8


@pytest.fixture(scope="module")
def server(pipe_dir, tmp_path_factory):
    """jedi-app on a free localhost port with --max-queue 8: yields (url, process); stopped by its pid after."""
    with running_app(pipe_dir, tmp_path_factory.mktemp("app_server"), "--max-queue", str(MAX_QUEUE)) as (url, proc, log):
        yield url, proc, log


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), np.uint8)).save(d / "ref.png")
    (d / "notes.png").write_bytes(b"not an image at all")
    (d / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "tiny.gif")  # decodes: a warning, not an error
    return d


def call(url, refs, seed, steps=2):
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    return client.predict([handle_file(str(r)) for r in refs], "", "a toy on the beach", 1, steps, 3.0, 1.0,
                          "default", str(seed), False, api_name="/generate")


def test_concurrent_generates_bad_uploads_and_a_full_queue(server, files):
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    url, proc, log = server
    # 8 clients at once: every one is served (one at a time on the one model), each with its own seed
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: call(url, [files / "ref.png"], s), range(8)))
    assert [r[3].split("seed ")[1].split(",")[0] for r in results] == [str(s) for s in range(8)]
    assert all(len(r[0]) == 1 and os.path.isfile(r[0][0]["image"]) for r in results)

    # bad uploads: one line naming the file, and the server stays up
    for bad, words in (("notes.png", "notes.png is not a readable image"), ("empty.jpg", "empty.jpg")):
        with pytest.raises(AppError) as e:
            call(url, [files / bad], 0)
        msg = str(e.value)
        assert words in msg and "\n" not in msg.strip() and "Traceback" not in msg, msg
    with pytest.raises(AppError, match="at most 8"):
        call(url, [files / "ref.png"] * 9, 0)
    assert proc.poll() is None

    # more slow requests than --max-queue: the rest are turned away with the queue-full error, the accepted
    # ones finish, and the server answers afterwards
    def slow(seed):
        try:
            return call(url, [files / "ref.png"], seed, steps=40)
        except QueueError as e:
            return e
    with ThreadPoolExecutor(MAX_QUEUE + 6) as pool:
        out = list(pool.map(slow, range(MAX_QUEUE + 6)))
    refused = [o for o in out if isinstance(o, QueueError)]
    served = [o for o in out if not isinstance(o, QueueError)]
    assert refused and all("Queue is full" in str(e) for e in refused), out
    assert len(served) >= MAX_QUEUE, out
    assert call(url, [files / "ref.png"], 99)[3].startswith("1 image")
    assert proc.poll() is None and "Traceback" not in log.read_text()
