"""download against a real HTTP server on 127.0.0.1, and the local sources (folder, HF dataset, manifests)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from src.config.settings import Http
from src.data.files import read_jsonl, sha256
from src.data.sources import SourceError, folder_items, hf_items, manifest_items, unique_ids
from src.stages.download import run
from testkit.http_server import LoopbackServer, Route, drip, flaky, no_length, ok, redirect, stall, status
from testkit.photos import png_header_only, tree
from testkit.project import kill_midway, make_repo
from testkit.project import run as run_cmd

# A timeout with room for a loaded CI machine; the slow and stalled routes take many times longer.
FAST = Http(workers=8, timeout_s=2.0, retries=1, backoff_s=0.05, max_bytes=200_000, user_agent="test",
                  snapshot="s1")


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (48, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_manifest(path: Path, urls: list[str], labels: list[str] | None = None) -> Path:
    labels = labels or ["fire"] * len(urls)
    path.write_text("".join(json.dumps({"url": u, "label": lab}) + "\n" for u, lab in zip(urls, labels)))
    return path


GOOD = [image_bytes(i, "JPEG" if i % 2 else "PNG") for i in range(3)]
HTML = b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n"


def bad_web_routes() -> dict:
    return {
        "/good0.png": ok(GOOD[0], "image/png"),
        "/good1.jpg": ok(GOOD[1], "image/jpeg"),
        "/good2": ok(GOOD[2], "text/plain"),  # a wrong content type does not matter: content decides
        "/copy-of-good1.jpg": ok(GOOD[1], "image/jpeg"),
        "/moved.jpg": redirect("/good1.jpg"),
        "/flaky.png": flaky(1, ok(GOOD[0], "image/png")),
        "/missing.jpg": status(404),
        "/broken.jpg": status(500),
        "/slow.jpg": drip(GOOD[1], every_s=0.25),
        "/stalled.jpg": stall(10.0, GOOD[1][:100]),
        "/stalled-headers.jpg": lambda h: h.server.closing.wait(10.0),
        "/error-page.jpg": ok(HTML, "image/jpeg"),
        "/truncated.jpg": ok(GOOD[1][: len(GOOD[1]) // 2], "image/jpeg"),
        "/to-file": redirect("file:///etc/passwd"),
        "/huge.jpg": ok(b"\xff\xd8" + b"\0" * 300_000, "image/jpeg"),
        "/huge-no-length.png": no_length(b"\0" * 300_000),
        "/bomb.png": ok(png_header_only(30_000, 30_000), "image/png"),
        "/empty.jpg": ok(b"", "image/jpeg"),
    }


def test_every_bad_url_becomes_a_failed_record_with_its_cause(tmp_path: Path) -> None:
    with LoopbackServer(bad_web_routes()) as srv:
        paths = list(bad_web_routes())
        urls = [srv.url(p) for p in paths] + ["file:///etc/passwd", "ftp://127.0.0.1/x.jpg", ""]
        items = manifest_items(write_manifest(tmp_path / "urls.jsonl", urls))
        summary = run(items, tmp_path / "dl", tmp_path / "m.json", FAST, max_failure_rate=1.0)
        rows = {r["url"].replace(srv.base, ""): r for r in read_jsonl(tmp_path / "dl" / "manifest.jsonl")}
        hits = {p: srv.hits(p) for p in paths}

    assert len(rows) == len(urls) == summary["items"]  # nothing lost
    for p in ("/good0.png", "/good1.jpg", "/good2", "/copy-of-good1.jpg", "/moved.jpg", "/flaky.png", "/truncated.jpg"):
        assert rows[p]["status"] == "ok", rows[p]
    assert rows["/good2"]["format"] == "JPEG" or rows["/good2"]["format"] == "PNG"
    assert rows["/good1.jpg"]["sha256"] == sha256(GOOD[1]) and rows["/good1.jpg"]["bytes"] == len(GOOD[1])
    assert (rows["/good1.jpg"]["width"], rows["/good1.jpg"]["height"]) == (48, 32)
    # De-duplication by content: stored once, later copies point at the first.
    assert rows["/copy-of-good1.jpg"]["duplicate_of"] == rows["/good1.jpg"]["id"]
    assert rows["/moved.jpg"]["duplicate_of"] == rows["/good1.jpg"]["id"]
    assert rows["/flaky.png"]["duplicate_of"] == rows["/good0.png"]["id"]
    assert len(list((tmp_path / "dl" / "images").iterdir())) == 4  # good0, good1, good2, truncated
    expect = {
        "/missing.jpg": ("http_404", "HTTP 404"),
        "/broken.jpg": ("http_500", "HTTP 500 Internal Server Error (after 2 attempts)"),
        "/slow.jpg": ("timeout", "slow host: body not complete within 2 s"),
        "/stalled.jpg": ("timeout", "read timeout"),
        "/stalled-headers.jpg": ("timeout", "read timeout"),
        "/error-page.jpg": ("not_image", f"not an image: {len(HTML)} bytes starting b'<!DOCTYPE html>"),
        "/to-file": ("scheme", "refused redirect from"),
        "/huge.jpg": ("too_large", "Content-Length 300002 exceeds max_bytes 200000"),
        "/huge-no-length.png": ("too_large", "body exceeds max_bytes 200000"),
        "/bomb.png": ("too_many_pixels", "too many pixels"),
        "/empty.jpg": ("not_image", "empty body"),
        "file:///etc/passwd": ("scheme", "scheme 'file' is not http or https"),
        "ftp://127.0.0.1/x.jpg": ("scheme", "scheme 'ftp'"),
        "": ("scheme", "scheme '(none)'"),
    }
    for p, (kind, words) in expect.items():
        r = rows[p]
        assert (r["status"], r["error_kind"]) == ("failed", kind), r
        assert words in r["error"] and r["sha256"] is None and r["path"] is None, r
    assert "'file:///etc/passwd'" in rows["/to-file"]["error"]
    # Retries only where the failure may pass: 404 once, 500 and the flaky host twice.
    assert (hits["/missing.jpg"], hits["/broken.jpg"], hits["/flaky.png"], hits["/stalled.jpg"]) == (1, 2, 2, 2)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["ok"] + metrics["failed"] == metrics["items"] == len(urls)
    assert metrics["duplicates"] == 3 and metrics["errors"]["timeout"] == 3 and metrics["errors"]["scheme"] == 4
    assert not (tmp_path / "dl" / "journal.jsonl").exists()


def test_failure_gate_passes_below_and_stops_above_with_a_clear_message(tmp_path: Path) -> None:
    routes = {f"/ok{i}.jpg": ok(image_bytes(i)) for i in range(4)} | {"/gone.jpg": status(404)}
    with LoopbackServer(routes) as srv:
        items = manifest_items(write_manifest(tmp_path / "u.jsonl", [srv.url(p) for p in routes]))
        assert run(items, tmp_path / "a", tmp_path / "a.json", FAST, max_failure_rate=0.2)["failure_rate"] == 0.2
        with pytest.raises(SystemExit) as e:
            run(items, tmp_path / "b", tmp_path / "b.json", FAST, max_failure_rate=0.1)
    msg = str(e.value.code)
    assert "failure rate 20.0% (1/5) exceeds download.max_failure_rate 10.0%" in msg and "http_404 1" in msg
    assert len(read_jsonl(tmp_path / "b" / "manifest.jsonl")) == 5  # the evidence is kept for inspection


KILL_SCRIPT = """
import json, sys
from pathlib import Path
from src.stages.download import run
from src.config.settings import Http
from src.data.sources import manifest_items
out, manifest = Path(sys.argv[1]), Path(sys.argv[2])
cfg = Http(workers=2, timeout_s=5, retries=0, backoff_s=0, max_bytes=10**6, user_agent="t", snapshot="s1")
run(manifest_items(manifest), out, out.parent / (out.name + ".json"), cfg, 1.0)
"""


def test_two_sigkills_and_a_torn_journal_then_rerun_fetches_only_the_rest_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    n = 40
    routes = {f"/p{i:02d}.jpg": ok(image_bytes(100 + i), "image/jpeg", delay_s=0.05) for i in range(n)}
    routes["/p07.jpg"] = status(404)  # failures are part of the record too
    with LoopbackServer(routes) as srv:
        manifest = write_manifest(tmp_path / "u.jsonl", [srv.url(p) for p in routes])
        out = tmp_path / "killed"
        journal = kill_midway(KILL_SCRIPT, [str(out), str(manifest)], out / "journal.jsonl", 12, timeout_s=20)
        assert 12 <= len(journal) < n and not (out / "manifest.jsonl").exists()  # it really died midway
        with (out / "journal.jsonl").open("a") as f:  # what a kill in the middle of an append leaves
            f.write('{"id": "url-torn", "sta')
        journal = kill_midway(KILL_SCRIPT, [str(out), str(manifest)], out / "journal.jsonl", len(journal) + 8,
                              timeout_s=20)  # killed a second time, on top of the torn line
        assert len(journal) < n and not (out / "manifest.jsonl").exists()
        stored = {r["url"].replace(srv.base, "") for r in journal if r["status"] == "ok"}
        srv.clear_log()
        run(manifest_items(manifest), out, tmp_path / "killed.json", FAST, 1.0)
        refetched = srv.paths()
        srv.clear_log()
        run(manifest_items(manifest), tmp_path / "clean", tmp_path / "clean.json", FAST, 1.0)
        srv.clear_log()
        run(manifest_items(manifest), out, tmp_path / "killed.json", FAST, 1.0)  # a rerun of a finished store
        assert srv.paths() == ["/p07.jpg"]  # only the failure is tried again

    assert not set(refetched) & stored, "a stored item was fetched again"
    assert set(refetched) == set(routes) - stored and len(refetched) == len(set(refetched))
    assert tree(out) == tree(tmp_path / "clean")  # byte-identical outputs
    assert (tmp_path / "killed.json").read_bytes() == (tmp_path / "clean.json").read_bytes()


def test_manifest_readers_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("url,label,license,source\nhttp://x/1.jpg,fire,CC-BY-4.0,flickr\n"
                                    "http://x/1.jpg,,,\n,metal,,\n")
    items = manifest_items(tmp_path / "a.csv")
    assert [(i.url, i.label, i.licence, i.source) for i in items] == [
        ("http://x/1.jpg", "fire", "CC-BY-4.0", "flickr"), ("http://x/1.jpg", None, None, "a.csv"), ("", "metal", None, "a.csv")]
    assert len({i.id for i in items}) == 3 and items[1].id == items[0].id + "-2"
    (tmp_path / "b.jsonl").write_text('{"url": "https://y/2.png", "id": "k", "licence": "CC0"}\n\n{"url": "https://y/3.png", "id": "k"}\n')
    assert [(i.id, i.licence) for i in manifest_items(tmp_path / "b.jsonl")] == [("k", "CC0"), ("k-2", None)]
    (tmp_path / "c.csv").write_text("link\nhttp://x\n")
    with pytest.raises(ValueError, match="no 'url' column"):
        manifest_items(tmp_path / "c.csv")
    assert unique_ids(["a", "a", "a-2", "a"]) == ["a", "a-2", "a-2-2", "a-3"]


def test_folder_source_with_class_subfolders(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    for i, (label, name) in enumerate([("fire", "a.jpg"), ("fire", "b.png"), ("water", "c.jpeg"), ("water", "notes.txt")]):
        (src / label).mkdir(parents=True, exist_ok=True)
        (src / label / name).write_bytes(b"just text" if name.endswith(".txt") else image_bytes(i, "PNG" if i == 2 else "JPEG"))
    (src / ".DS_Store").write_bytes(b"junk")
    items = folder_items(src, True, ("fire", "water"))
    summary = run(items, tmp_path / "dl", tmp_path / "m.json", FAST, max_failure_rate=0.5)
    rows = read_jsonl(tmp_path / "dl" / "manifest.jsonl")
    assert [(r["url"], r["label"], r["status"]) for r in rows] == [
        ("folder:fire/a.jpg", "fire", "ok"), ("folder:fire/b.png", "fire", "ok"),
        ("folder:water/c.jpeg", "water", "ok"), ("folder:water/notes.txt", "water", "failed")]
    assert rows[2]["format"] == "PNG"  # content, not extension, decides
    assert rows[3]["error_kind"] == "not_image" and summary["failed"] == 1


def test_hf_dataset_source_built_in_process(tmp_path: Path) -> None:
    import datasets  # pinned in requirements.txt: missing, the install is broken (a failure, not a skip)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["water", "fire"])})
    imgs = [Image.open(io.BytesIO(image_bytes(i, "PNG"))) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [1, 0, 1]}, features=features)
    ds.save_to_disk(str(tmp_path / "hfds"))
    items = hf_items(str(tmp_path / "hfds"), "", "", "train", "image", "label")
    run(items, tmp_path / "dl", tmp_path / "m.json", FAST, max_failure_rate=0.0)
    rows = read_jsonl(tmp_path / "dl" / "manifest.jsonl")
    assert [(r["id"], r["label"], r["status"], r["format"]) for r in rows] == [
        ("hf-0000000", "fire", "ok", "PNG"), ("hf-0000001", "water", "ok", "PNG"), ("hf-0000002", "fire", "ok", "PNG")]
    assert rows[0]["sha256"] == sha256((tmp_path / "dl" / rows[0]["path"]).read_bytes())
    with pytest.raises(SourceError, match="download.hf.image_column = 'picture': not a column"):
        hf_items(str(tmp_path / "hfds"), "", "", "train", "picture", "")


# ---- the source as DVC knows it: a real DVC repo, the download stage alone --------------------------

def test_a_photo_gone_from_the_folder_is_counted_as_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(image_bytes(i))
    out = tmp_path / "dl"
    run(folder_items(photos, False, ()), out, tmp_path / "m.json", FAST, 0.0)
    (photos / "1.jpg").unlink()
    capsys.readouterr()
    run(folder_items(photos, False, ()), out, tmp_path / "m.json", FAST, 0.0)
    assert "2 ok (0 duplicates), 0 failed; work: fetched 0, decoded 0, revalidated 0, unchanged 2, current 0, " \
           "failed 0, removed 1 ->" in capsys.readouterr().out
    assert [r["name"] for r in read_jsonl(out / "manifest.jsonl")] == ["0.jpg", "2.jpg"]
    run(folder_items(photos, False, ()), out, tmp_path / "m.json", FAST, 0.0)
    assert ", removed 0 ->" in capsys.readouterr().out  # counted once: against the last run's output


def test_failed_urls_are_named_on_the_console_with_their_cause(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = {"/ok.jpg": ok(image_bytes(0)), "/gone.jpg": status(404), "/page.jpg": ok(HTML)}
    with LoopbackServer(routes) as srv:
        capsys.readouterr()
        run(manifest_items(write_manifest(tmp_path / "urls.jsonl", [srv.url(p) for p in routes])), tmp_path / "dl",
            tmp_path / "m.json", FAST, max_failure_rate=1.0)
        said = capsys.readouterr().out
        assert (f"download: 2 failed (every one with its cause in {tmp_path / 'dl' / 'manifest.jsonl'}):\n"
                f"  {srv.url('/gone.jpg')}: HTTP 404 Not Found\n"
                f"  {srv.url('/page.jpg')}: not an image: {len(HTML)} bytes starting ") in said


def dvc_status(repo: Path) -> dict:
    return json.loads(run_cmd(["dvc", "status", "download", "--json"], repo).stdout or "{}")


def etagged(data: bytes, etag: str) -> Route:
    """A host that answers If-None-Match with 304, as real static hosts do."""
    def route(h: Any) -> None:
        if h.headers.get("If-None-Match") == etag:
            h.send_response(304)
            h.send_header("ETag", etag)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        ok(data, "image/jpeg", headers={"ETag": etag})(h)
    return route


@pytest.mark.slow
def test_folder_source_photo_added_or_removed_makes_download_stale_and_only_it_is_decoded(tmp_path: Path) -> None:
    photos = tmp_path / "my photos"  # outside the repository, with a space: as a user's folder is
    for i, label in enumerate(["fire", "fire", "water", "water"]):
        (photos / label).mkdir(parents=True, exist_ok=True)
        (photos / label / f"{i}.jpg").write_bytes(image_bytes(i))
    repo = make_repo(tmp_path / "repo", {"download.source": "folder", "download.folder.path": str(photos)})
    first = run_cmd(["dvc", "repro", "download"], repo).stdout
    assert "decoded 4, revalidated 0, unchanged 0" in first and dvc_status(repo) == {}

    (photos / "water" / "new.jpg").write_bytes(image_bytes(99))
    assert "download" in dvc_status(repo)
    assert "decoded 1, revalidated 0, unchanged 4" in run_cmd(["dvc", "repro", "download"], repo).stdout

    (photos / "fire" / "0.jpg").unlink()
    assert "download" in dvc_status(repo)
    assert "decoded 0, revalidated 0, unchanged 4, current 0, failed 0, removed 1 ->" in run_cmd(
        ["dvc", "repro", "download"], repo).stdout
    names = [r["name"] for r in read_jsonl(repo / "data/download/manifest.jsonl")]
    assert names == ["fire/1.jpg", "water/2.jpg", "water/3.jpg", "water/new.jpg"]
    assert len(list((repo / "data/download/images").iterdir())) == 4  # the removed photo's file is gone too
    assert dvc_status(repo) == {}


@pytest.mark.slow
def test_manifest_row_added_fetches_only_it_and_a_new_snapshot_revalidates(tmp_path: Path) -> None:
    routes = {f"/p{i}.jpg": etagged(image_bytes(i), f'"v1-{i}"') for i in range(4)}
    with LoopbackServer(routes) as srv:
        repo = make_repo(tmp_path / "repo", {"download.source": "manifest", "download.manifest.path": "data/urls.csv"})
        write_csv = lambda paths: (repo / "data/urls.csv").write_text(  # noqa: E731
            "url,label\n" + "".join(f"{srv.url(p)},fire\n" for p in paths))
        write_csv(list(routes)[:3])
        run_cmd(["dvc", "repro", "download"], repo)
        assert sorted(srv.paths()) == ["/p0.jpg", "/p1.jpg", "/p2.jpg"] and dvc_status(repo) == {}

        srv.clear_log()
        write_csv(list(routes))  # one row added
        assert "download" in dvc_status(repo)
        run_cmd(["dvc", "repro", "download"], repo)
        assert srv.paths() == ["/p3.jpg"]

        srv.clear_log()
        run_cmd(["dvc", "repro", "-f", "download"], repo)  # the same snapshot: nothing is fetched again
        assert srv.paths() == []

        routes["/p1.jpg"] = etagged(image_bytes(101), '"v2-1"')  # new content behind a stored URL
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["download"]["http"]["snapshot"] = "a later day"
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert "download" in dvc_status(repo)
        out = run_cmd(["dvc", "repro", "download"], repo).stdout
        assert sorted(srv.paths()) == sorted(routes) and "fetched 1, decoded 0, revalidated 3" in out
    rows = read_jsonl(repo / "data/download/manifest.jsonl")
    assert rows[1]["sha256"] == sha256(image_bytes(101)) and {r["snapshot"] for r in rows} == {"a later day"}
