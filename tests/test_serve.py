"""``edgekt serve`` in process (ASGI test client): predict, few-shot, continual, security, bad
input, metrics, OpenAPI and hot reload, on a real exported package and real images."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _serve_support as sup
import numpy as np
import pytest
from _serve_support import BAG, SNEAKER

from edgekt.devices import EdgeModel
from edgekt.devices.serve.app import ServeSettings, create_app
from edgekt.devices.serve.inputs import Limits
from edgekt.devices.serve.service import Service
from edgekt.errors import EdgektError

device_models, photos = sup.device_models, sup.photos  # session fixtures
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t0ken-for-tests-0123456789"


@pytest.fixture
def make_client(device_models, tmp_path):
    """Build (service, client) pairs on the test package; all closed at the end."""
    from fastapi.testclient import TestClient

    opened = []

    def make(package: Path | None = None, state: Path | None = None, **settings):
        service = Service(package or device_models.package, state or tmp_path / "state",
                          threads=1)
        client = TestClient(create_app(service, ServeSettings(**settings)))
        client.__enter__()
        opened.append((service, client))
        return service, client

    yield make
    for service, client in opened:
        client.__exit__(None, None, None)
        service.close()


def _enroll(client, label, images, headers=None, name="p"):
    files = [("images", (f"{name}{i}.png", sup.png(img), "image/png"))
             for i, img in enumerate(images)]
    return client.post("/v1/fewshot/enroll", data={"label": label}, files=files,
                       headers=headers or {})


def _err(resp, status: int, code: str | None = None) -> str:
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()["error"]
    if code:
        assert body["code"] == code, body
    return body["message"]


# ---- import hygiene ---------------------------------------------------------------------------
BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'fastapi', 'starlette', 'uvicorn', 'prometheus_client',
                                  'paho', 'multipart', 'python_multipart'}:
            raise ImportError(f'blocked {name}', name=name)
sys.meta_path.insert(0, Block())
"""


def test_devices_import_without_the_serve_extra_and_cli_says_what_to_install(device_models):
    code = BLOCK + (
        "import edgekt.devices, edgekt.devices.model, edgekt.devices.fewshot\n"
        "import edgekt.devices.continual, edgekt.devices.serve, edgekt.devices.serve.service\n"
        "import edgekt.cli.app\n"
        "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules\n"
        "sys.argv = ['edgekt', 'serve', sys.argv[1]]\n"
        "edgekt.cli.app.main()\n")
    res = subprocess.run([sys.executable, "-c", code, str(device_models.package)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2, res.stderr
    err = " ".join(res.stderr.split())
    assert "pip install 'edgekt[serve]'" in err and "Traceback" not in err


def test_the_service_is_torch_free():
    code = ("import sys, edgekt.devices.serve.app, edgekt.devices.serve.events; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# ---- predict ----------------------------------------------------------------------------------
def test_predict_png_npy_json_match_the_in_process_model(make_client, device_models, photos):
    service, client = make_client()
    model = EdgeModel.load(device_models.package, threads=1)
    imgs = photos.images[:6]
    for img in imgs:
        want = model.predict_proba(img)
        for resp in (
            client.post("/v1/predict", content=sup.png(img), headers={"Content-Type": "image/png"}),
            client.post("/v1/predict", content=sup.npy(img),
                        headers={"Content-Type": "application/x-npy"}),
            client.post("/v1/predict", json={"array": img.tolist(), "dtype": "uint8"}),
            client.post("/v1/predict", files={"image": ("x.png", sup.png(img), "image/png")}),
        ):
            assert resp.status_code == 200, resp.text
            r = resp.json()
            assert r["label"] == model.labels[int(want.argmax())]
            assert r["scores"][0]["score"] == pytest.approx(float(want.max()), abs=1e-5)
            assert r["model_version"] == service.package.version and r["head"] == "classifier"
            assert r["latency_ms"]["total"] >= r["latency_ms"]["inference"] > 0
    # An RGB photo is converted to the model's grey input exactly as the runtime would.
    rgb = client.post("/v1/predict?top=3", content=sup.png(imgs[0], "RGB"),
                      headers={"Content-Type": "image/png"}).json()
    assert rgb["label"] == model.predict(imgs[0]) and len(rgb["scores"]) == 3
    # A larger photo is resized to the model's 28x28 (Pillow bilinear, as the runtime does).
    from PIL import Image

    big = np.asarray(Image.fromarray(imgs[1]).resize((112, 112), Image.BILINEAR))
    r = client.post("/v1/predict", content=sup.png(big), headers={"Content-Type": "image/png"})
    assert r.json()["label"] == model.predict(big)


# ---- few-shot ---------------------------------------------------------------------------------
def test_enroll_predict_list_remove_and_restart(make_client, photos, tmp_path):
    service, client = make_client()
    assert client.get("/v1/fewshot/labels").json()["labels"] == []
    _err(client.post("/v1/fewshot/predict", content=sup.png(photos.of(SNEAKER, 1)[0]),
                     headers={"Content-Type": "image/png"}), 409, "no_classes")
    r = _enroll(client, "Sneaker 👟", photos.of(SNEAKER, 5))
    assert r.status_code == 200, r.text
    assert r.json()["shots"] == 5 and r.json()["classes"] == 1
    assert _enroll(client, "bag", photos.of(BAG, 5)).json()["classes"] == 2
    # JSON arrays and ?replace work too: 3 more shots, then start 'bag' over from 2.
    r = client.post("/v1/fewshot/enroll", json={
        "label": "Sneaker 👟", "arrays": [a.tolist() for a in photos.of(SNEAKER, 3, 5)]})
    assert r.json()["shots"] == 8
    assert _enroll(client, "bag", photos.of(BAG, 5, 5)).json()["shots"] == 10

    right = 0
    queries = [(img, "Sneaker 👟") for img in photos.of(SNEAKER, 15, 40)] + \
        [(img, "bag") for img in photos.of(BAG, 15, 40)]
    for img, truth in queries:
        r = client.post("/v1/fewshot/predict", content=sup.png(img),
                        headers={"Content-Type": "image/png"}).json()
        assert r["head"] == "fewshot" and r["nearest"] in ("Sneaker 👟", "bag")
        assert "novelty" in r  # null without a calibrated normaliser
        right += r["label"] == truth
    assert right / len(queries) > 0.8, right  # two classes: chance is 0.5

    listed = client.get("/v1/fewshot/labels").json()
    assert [(x["label"], x["shots"]) for x in listed["labels"]] == [("Sneaker 👟", 8),
                                                                     ("bag", 10)]
    r = client.delete("/v1/fewshot/labels/bag")
    assert r.status_code == 200 and r.json()["classes"] == 1
    _err(client.delete("/v1/fewshot/labels/bag"), 404, "unknown_label")
    # A label with a slash is data: it round-trips through the URL.
    assert _enroll(client, "a/b", photos.of(BAG, 2)).status_code == 200
    assert client.delete("/v1/fewshot/labels/a%2Fb").status_code == 200

    # A second service may not share the state directory; after a restart the state is back.
    with pytest.raises(EdgektError, match="owned by another edgekt serve"):
        Service(service.package_path, service.state_dir)
    service.close()
    _, client2 = make_client(state=service.state_dir)
    assert [x["label"] for x in client2.get("/v1/fewshot/labels").json()["labels"]] == \
        ["Sneaker 👟"]


def test_concurrent_enrollments_of_one_label_get_409(make_client, photos, monkeypatch):
    service, client = make_client()
    clf = service.runtime.fewshot
    entered, release = threading.Event(), threading.Event()
    real_embed = clf.embed

    def slow_embed(samples):
        entered.set()
        assert release.wait(10)
        return real_embed(samples)

    monkeypatch.setattr(clf, "embed", slow_embed)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_enroll, client, "mug", photos.of(BAG, 3))
        assert entered.wait(10)
        second = _enroll(client, "mug", photos.of(BAG, 3, 3))
        release.set()
        assert first.result().status_code == 200
    assert "already in progress" in _err(second, 409, "label_busy")
    assert [(x["label"], x["shots"]) for x in client.get("/v1/fewshot/labels").json()["labels"]] \
        == [("mug", 3)]


# ---- bad input: JSON errors, state unchanged -------------------------------------------------
def test_bad_input_gets_json_errors_and_changes_nothing(make_client, photos, tmp_path):
    from PIL import Image

    service, client = make_client(limits=Limits(max_body_bytes=200_000, max_images=4))
    assert _enroll(client, "bag", photos.of(BAG, 2)).status_code == 200
    state = service.state_dir / "fewshot_state.npz"
    before = state.read_bytes()
    img = photos.of(SNEAKER, 1)[0]
    png_ct = {"Content-Type": "image/png"}

    def enroll_raw(content, label="shoe", ctype="image/png"):
        return client.post(f"/v1/fewshot/enroll?label={label}", content=content,
                           headers={"Content-Type": ctype})

    _err(enroll_raw(b"this is not an image"), 415, "unsupported_media_type")
    _err(enroll_raw(b""), 422, "invalid_input")
    _err(enroll_raw(sup.png(img)[:60]), 422, "invalid_input")  # truncated PNG
    _err(enroll_raw(b"\0" * 300_000), 413, "payload_too_large")  # over the body limit
    bomb = Image.new("L", (6000, 6000))  # 36 MP of zeros: a few kB of PNG
    buf = __import__("io").BytesIO()
    bomb.save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    assert "MP" in _err(enroll_raw(buf.getvalue()), 413, "payload_too_large")
    for label in ("", "   ", "x" * 10_000, "two\nlines", "nul\0", " padded"):
        files = [("images", ("a.png", sup.png(img), "image/png"))]
        _err(client.post("/v1/fewshot/enroll", data={"label": label}, files=files), 422)
    _err(_enroll(client, "shoe", photos.of(SNEAKER, 5)), 413)  # more than max_images
    _err(enroll_raw(sup.png(img), ctype="text/plain"), 415)
    _err(client.post("/v1/fewshot/enroll", content=b"{oops", headers={
        "Content-Type": "application/json"}), 400)
    _err(client.post("/v1/fewshot/enroll", json={"arrays": [img.tolist()]}), 422)  # no label
    _err(client.post("/v1/fewshot/enroll", json={"label": "x", "arrays": [[[300]]]}), 422)
    _err(client.post("/v1/fewshot/enroll", json={"label": "x", "array": [[1, 2], [3]]}), 422)
    # The model's own check (7 channels is no image) comes back as JSON too.
    _err(client.post("/v1/fewshot/enroll?label=x", content=sup.npy(np.zeros((28, 28, 7),
                     np.uint8)), headers={"Content-Type": "application/x-npy"}), 422)
    _err(client.post("/v1/predict", content=sup.npy(np.zeros((3, 28, 28), np.uint8)),
                     headers={"Content-Type": "application/x-npy"}), 422)  # a batch
    _err(client.post("/v1/predict", content=b"GIF89a", headers=png_ct), 415)  # header only
    _err(client.get("/v1/nothing"), 404, "not_found")
    _err(client.get("/v1/predict"), 405)
    assert state.read_bytes() == before
    assert [x["label"] for x in client.get("/v1/fewshot/labels").json()["labels"]] == ["bag"]


def test_token_guards_state_changes_but_not_reads(make_client, photos):
    _, client = make_client(token=TOKEN)
    imgs = photos.of(SNEAKER, 2)
    resp = _enroll(client, "shoe", imgs)
    assert "Bearer" in _err(resp, 401, "unauthorized")
    assert resp.headers["www-authenticate"] == "Bearer"
    _err(_enroll(client, "shoe", imgs, {"Authorization": "Bearer wrong-token-0123456789"}),
         401)
    _err(_enroll(client, "shoe", imgs, {"Authorization": TOKEN}), 401)  # no scheme
    _err(client.post("/v1/admin/reload"), 401)
    _err(client.delete("/v1/fewshot/labels/shoe"), 401)
    assert client.get("/v1/fewshot/labels").json()["labels"] == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _enroll(client, "shoe", imgs, auth).status_code == 200
    assert client.post("/v1/predict", content=sup.png(imgs[0]),
                       headers={"Content-Type": "image/png"}).status_code == 200
    assert client.get("/healthz").json()["auth_required"] is True


def test_cors_is_off_unless_configured(make_client):
    _, plain = make_client()
    pre = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in plain.options("/v1/predict", headers=pre).headers
    _, allowed = make_client(state=Path(plain.app.state.service.state_dir).with_name("s2"),
                             cors_origins=("http://app.local",))
    r = allowed.options("/v1/predict", headers={**pre, "Origin": "http://app.local"})
    assert r.headers["access-control-allow-origin"] == "http://app.local"
    r = allowed.options("/v1/predict", headers=pre)
    assert "access-control-allow-origin" not in r.headers


# ---- continual --------------------------------------------------------------------------------
def test_continual_feedback_learns_and_persists(make_client, photos):
    service, client = make_client()
    _err(client.post("/v1/continual/predict", content=sup.png(photos.images[0]),
                     headers={"Content-Type": "image/png"}), 409, "no_classes")
    train = [(img, "sneaker") for img in photos.of(SNEAKER, 25)] + \
        [(img, "bag") for img in photos.of(BAG, 25)]
    order = np.random.default_rng(0).permutation(len(train))
    for k, i in enumerate(order):
        img, label = train[i]
        path = "/v1/continual/feedback" if k % 2 else "/v1/continual/observe"
        r = client.post(f"{path}?label={label}", content=sup.png(img),
                        headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
    assert r.json()["generation"] == len(train)  # each one committed before the answer
    status = client.get("/v1/continual").json()
    assert sorted(status["labels"]) == ["bag", "sneaker"]
    assert status["counters"]["samples"] == len(train)
    queries = [(img, "sneaker") for img in photos.of(SNEAKER, 20, 100)] + \
        [(img, "bag") for img in photos.of(BAG, 20, 100)]
    preds = [client.post("/v1/continual/predict", content=sup.png(img),
                         headers={"Content-Type": "image/png"}).json()["label"]
             for img, _ in queries]
    acc = np.mean([p == t for p, (_, t) in zip(preds, queries, strict=True)])
    assert acc > 0.8, acc  # chance: 0.5
    _err(client.post("/v1/continual/observe", content=sup.png(photos.images[0]),
                     headers={"Content-Type": "image/png"}), 422)  # no label
    service.close()
    _, again = make_client(state=service.state_dir)
    assert again.get("/v1/continual").json()["counters"]["samples"] == len(train)


# ---- service endpoints ------------------------------------------------------------------------
def test_healthz_metrics_openapi_info(make_client, photos):
    service, client = make_client()
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["version"] == service.package.version
    assert h["capabilities"] == {"predict": True, "fewshot": True, "continual": True}
    assert h["mqtt"] is None and h["auth_required"] is False
    for img in photos.images[:3]:
        client.post("/v1/predict", content=sup.png(img), headers={"Content-Type": "image/png"})
    _enroll(client, "bag", photos.of(BAG, 2))
    client.post("/v1/predict", content=b"x", headers={"Content-Type": "image/png"})
    text = client.get("/metrics").text
    assert 'edgekt_serve_requests_total{method="POST",route="/v1/predict",status="200"} 3.0' \
        in text
    assert 'edgekt_serve_requests_total{method="POST",route="/v1/predict",status="415"} 1.0' \
        in text
    assert 'edgekt_serve_predictions_total{head="classifier"} 3.0' in text
    assert "edgekt_serve_enrolled_classes 1.0" in text
    assert 'edgekt_serve_state_changes_total{kind="enrolled"} 1.0' in text
    assert f'edgekt_serve_model_info{{version="{service.package.version}"}} 1.0' in text
    assert 'edgekt_serve_reloads_total{result="rolled_back"} 0.0' in text
    assert "edgekt_serve_request_seconds_bucket" in text and "edgekt_serve_drift_alarms" in text
    spec = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/fewshot/enroll", "/v1/fewshot/labels/{label}",
                 "/v1/continual/observe", "/v1/admin/reload", "/healthz", "/metrics"):
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/v1/fewshot/enroll"]["post"]["requestBody"][
        "content"]
    info = client.get("/v1/info").json()
    assert info["image"] == {"mode": "L", "size": [28, 28]} and len(info["labels"]) == 10
    assert "/" not in json.dumps(info["models"]["classifier"]["path"])  # no file system layout
    page = client.get("/")
    assert page.status_code == 200 and "edgekt serve" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 404  # Swagger UI would need a CDN


# ---- hot reload -------------------------------------------------------------------------------
def test_hot_reload_swaps_compatible_versions_and_rolls_back_the_rest(
        make_client, device_models, photos, tmp_path):
    pkg = sup.copy_package(device_models.package, tmp_path / "pkg")
    service, client = make_client(package=pkg)
    v1 = service.package.version
    assert client.post("/v1/admin/reload").json()["result"] == "unchanged"
    assert _enroll(client, "bag", photos.of(BAG, 3)).status_code == 200

    # A new version of the same models, while predictions keep flowing: none is dropped.
    stop, statuses = threading.Event(), []

    def hammer():
        img = sup.png(photos.images[0])
        while not stop.is_set():
            statuses.append(client.post("/v1/predict", content=img,
                                        headers={"Content-Type": "image/png"}).status_code)

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        sup.bump_version(pkg, "v2")
        r = client.post("/v1/admin/reload").json()
    finally:
        stop.set()
        worker.join()
    assert r["result"] == "reloaded" and r["previous"] == v1 and r["version"] != v1
    v2 = r["version"]
    assert statuses and set(statuses) == {200}, set(statuses)
    assert client.get("/healthz").json()["version"] == v2
    assert [x["label"] for x in client.get("/v1/fewshot/labels").json()["labels"]] == ["bag"]

    # An embedding from another checkpoint would make the enrolled prototypes meaningless.
    other = sup.other_embedding_package(device_models.package, tmp_path / "other")
    pkg.rename(tmp_path / "v2")
    other.rename(pkg)
    msg = _err(client.post("/v1/admin/reload"), 409, "reload_refused")
    assert "another checkpoint" in msg and v2 in msg
    # A broken package: refused, still serving v2.
    pkg.rename(tmp_path / "other")
    sup.copy_package(tmp_path / "v2", pkg)
    (pkg / "model.onnx").write_bytes(b"not a model")
    sup.bump_version(pkg, "broken")
    _err(client.post("/v1/admin/reload"), 422, "reload_refused")
    assert client.get("/healthz").json()["version"] == v2
    assert client.post("/v1/predict", content=sup.png(photos.images[0]),
                       headers={"Content-Type": "image/png"}).status_code == 200
    text = client.get("/metrics").text
    assert 'edgekt_serve_reloads_total{result="rolled_back"} 2.0' in text
    assert 'edgekt_serve_reloads_total{result="reloaded"} 1.0' in text
    # Without enrolled classes the other embedding is a legitimate new model.
    assert client.delete("/v1/fewshot/labels/bag").status_code == 200
    shutil_rm(pkg)
    (tmp_path / "other").rename(pkg)
    assert client.post("/v1/admin/reload").json()["result"] == "reloaded"


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def test_single_model_files_serve_what_they_have(make_client, device_models, photos, tmp_path):
    png = {"Content-Type": "image/png"}
    img = sup.png(photos.images[0])
    service, emb = make_client(package=device_models.embedding, state=tmp_path / "e")
    assert service.capabilities() == {"predict": False, "fewshot": True, "continual": True}
    _err(emb.post("/v1/predict", content=img, headers=png), 404, "no_classifier")
    assert _enroll(emb, "bag", photos.of(BAG, 2)).status_code == 200
    service, cls = make_client(package=device_models.classifier, state=tmp_path / "c")
    assert service.capabilities() == {"predict": True, "fewshot": False, "continual": False}
    assert cls.post("/v1/predict", content=img, headers=png).status_code == 200
    _err(_enroll(cls, "bag", photos.of(BAG, 2)), 404, "no_fewshot")
    _err(cls.post("/v1/continual/observe?label=x", content=img, headers=png), 404)
    _err(cls.get("/v1/fewshot/labels"), 404, "no_fewshot")
