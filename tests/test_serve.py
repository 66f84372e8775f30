"""--mode=serve over HTTP on 127.0.0.1 (tiny model): load (grouping, seed determinism), bad
input, Stop, and a headless Chromium driving the page. The queue alone: test_serve_queue.py."""
import asyncio
import concurrent.futures
import os
import shutil
import socket
import time

import numpy as np
import pytest
from PIL import Image

from unidiffuser_jax import sample
from unidiffuser_jax.diffusion import solvers

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# ---------------------------------------------------------------- the page over HTTP

pytest.importorskip("gradio", reason="gradio is an optional extra: "
                    "pip install -r requirements-serve.txt")
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("unidiffuser_jax.serve")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _png(path, w, h, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(path)
  return str(path)


@pytest.fixture(scope="module")
def served(tiny_sampler):
  config, _, _, root = tiny_sampler
  config = config.copy_and_resolve_references()
  config.serve.update(tasks=("t2i", "i2t"), steps=(3,), batch_size=8, max_samples=4,
                      max_wait_ms=300, max_upload_mb=0.25, max_image_pixels=256 * 256,
                      max_prompt_chars=120, port=_free_port(), output_dir=str(root / "served"))
  server = serve.Server(config, str(root))
  page = serve.build_page(server)
  serve.launch(server, page, block=False)
  assert server.ready.wait(300), "the programs did not compile in 5 minutes"
  url = f"http://127.0.0.1:{config.serve.port}/"
  yield server, url, root
  page.close()
  server.close()


def _client(url):
  return gradio_client.Client(url, verbose=False, download_files=True)


def _t2i(client, prompt="a red circle on the left", seed=0, num=1, guidance=3.0, steps=3):
  return client.predict(prompt, seed, False, steps, guidance, num, api_name="/t2i")


def _pixels(item) -> bytes:
  return np.asarray(Image.open(item["image"])).tobytes()


@pytest.mark.slow
def test_concurrent_requests_share_batches_and_keep_their_seeds(served):
  """24 t2i requests from 8 clients: all complete, requests share batches, and each seed's
  image equals the same seed served alone and `sample.generate` keyed (seed, 0)."""
  server, url, _ = served
  n_before = len(server.batcher.batches)
  compiled = lambda: sum(f._cache_size() for fns in sample._COMPILED.values() for f in fns.values())
  programs = compiled()
  seeds = [100 + i % 12 for i in range(24)]   # every seed twice
  clients = [_client(url) for _ in range(8)]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    futs = [pool.submit(_t2i, clients[i % 8], seed=s) for i, s in enumerate(seeds)]
    results = [f.result(timeout=120) for f in futs]
  assert all(len(g) == 1 for g, _ in results)
  assert compiled() == programs   # padded into the programs built at start-up: no new compile
  batches = server.batcher.batches[n_before:]
  assert sum(n for _, n, _ in batches) == 24 and len(batches) < 24, batches
  assert max(n for _, n, _ in batches) > 1, batches
  by_seed = {}
  for s, (gallery, _) in zip(seeds, results):
    by_seed.setdefault(s, set()).add(_pixels(gallery[0]))
  assert all(len(v) == 1 for v in by_seed.values())   # same seed, same image, any batch
  assert len({next(iter(v)) for v in by_seed.values()}) == 12   # seeds differ
  alone, info = _t2i(clients[0], seed=105)
  assert {_pixels(alone[0])} == by_seed[105]
  assert "batch of 1 request" in info
  # ... and it is the sampler's sample 0 for seed 105 (what --mode=sample writes).
  cfg = server._configs[3].copy_and_resolve_references()
  cfg.sample.seed = 105
  rec = sample.generate("t2i", {"prompts": ["a red circle on the left"], "guidance": [3.0]}, 1,
                        cfg, progress=False, on_eval=server._on_eval, **server._sampler)
  assert rec[0]["pixels"].tobytes() == _pixels(alone[0])


@pytest.mark.slow
def test_generated_png_carries_its_parameters(served):
  server, url, _ = served
  s = server.config.sample   # progress counts every network evaluation, once per batch
  assert server._evals[("t2i", 3)] == solvers.num_model_evals(3, int(s.order), s.method)
  gallery, info = _t2i(_client(url), seed=7, num=2, guidance=2.5)
  assert len(gallery) == 2 and "seed 7" in info and "guidance_scale 2.5" in info
  text = Image.open(gallery[1]["image"]).text
  assert text["task"] == "t2i" and text["seed"] == "7" and text["sample"] == "1"
  assert text["prompt"] == "a red circle on the left" and text["steps"] == "3"
  assert '"guidance_scale": 2.5' in text["parameters"]


def _raw_call(url, api: str, data: list) -> str:
  """A call as any HTTP client can make it (not gradio_client): the event stream's text."""
  r = httpx.post(f"{url}gradio_api/call/{api}", json={"data": data}, timeout=30)
  r.raise_for_status()
  return httpx.get(f"{url}gradio_api/call/{api}/{r.json()['event_id']}", timeout=60).text


@pytest.mark.slow
def test_stop_drops_a_waiting_request(served):
  """Stop (gradio cancels the handler) takes a request out of the queue before it runs."""
  server, _, _ = served
  handler = serve._handler(server, "t2i")
  before = len(server.batcher.batches)

  async def go():
    job = asyncio.ensure_future(handler("a cat", None, None, 1, False, 3, 3.0, 1,
                                        progress=lambda *a, **k: None))
    await asyncio.sleep(0.05)   # queued: the batch waits up to max_wait_ms = 300 for company
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
      await job
  asyncio.run(go())
  time.sleep(0.6)
  assert len(server.batcher.batches) == before


@pytest.mark.slow
def test_progress_reports_the_denoising_step(served, monkeypatch):
  """The handler reports the running batch's network evaluations (here counted slowly by hand;
  the sampler's own count is checked in test_generated_png_carries_its_parameters)."""
  server, _, _ = served
  run = server.batcher._run_batch

  def slow(group, requests):
    for k in (1, 2):
      server._calls = k
      time.sleep(0.3)
    run(group, requests)
  monkeypatch.setattr(server.batcher, "_run_batch", slow)
  seen = []
  handler = serve._handler(server, "t2i")
  gallery, _ = asyncio.run(handler("a cat", None, None, 1, False, 3, 3.0, 1,
                                   progress=lambda p, desc=None, **k: seen.append(desc)))
  assert len(gallery) == 1
  assert seen[0].startswith("waiting for a batch") and "denoising: step 2 of 3" in seen, seen


def _error(fn, *args, **kw) -> str:
  with pytest.raises(Exception) as e:
    fn(*args, **kw)
  return str(e.value)


@pytest.mark.slow
def test_bad_input_gets_a_message_and_the_server_keeps_serving(served, tmp_path):
  server, url, root = served
  c = _client(url)
  i2t = lambda img: c.predict(img, 0, False, 3, 3.0, 1, api_name="/i2t")
  # prompts
  assert "prompt: it is empty" in _error(_t2i, c, prompt="   ")
  _, info = _t2i(c, prompt="red " * 40)   # over the characters and the tokens: cut, with notes
  assert "cut to its first 120 characters" in info and "the model reads the first 6" in info
  # numbers (gradio's own range checks, or the server's)
  assert "Seed" in _error(_t2i, c, seed=-3) or "minimum" in _error(_t2i, c, seed=-3)
  assert "7" in _error(_t2i, c, steps=7)
  assert "1000" in _error(_t2i, c, guidance=1000.0) or "maximum" in _error(_t2i, c,
                                                                               guidance=1000.0)
  assert "Number of samples" in _error(_t2i, c, num=99) or "maximum" in _error(_t2i, c, num=99)
  with pytest.raises(serve.BadInput, match="Guidance scale must be"):
    server.prepare("t2i", "a cat", guidance=float("nan"))
  with pytest.raises(serve.BadInput, match="Seed must be a number"):
    server.prepare("t2i", "a cat", seed="abc")
  # uploads
  text_file = tmp_path / "notes.png"
  text_file.write_text("not an image at all")
  assert "not an image this server can read" in _error(
      i2t, gradio_client.handle_file(str(text_file)))
  huge = _png(tmp_path / "huge.png", 600, 600)   # over 0.25 MB (and max_image_pixels)
  assert "maximum file size" in _error(i2t, gradio_client.handle_file(huge))   # the client's
  with open(huge, "rb") as f:    # the server's own limit, for a client that does not check
    r = httpx.post(url + "gradio_api/upload", files={"files": ("huge.png", f)}, timeout=30)
  assert r.status_code == 413 and "maximum" in r.text, (r.status_code, r.text)
  inside = os.path.join(server.upload_root, "test_serve_huge.png")
  shutil.copy(huge, inside)
  with pytest.raises(serve.BadInput, match="larger than the 0.25 MB limit"):
    server.prepare("i2t", image=inside)
  os.remove(inside)
  many = tmp_path / "many.png"
  Image.new("RGB", (300, 300)).save(many)   # few bytes, too many pixels
  assert "too many pixels" in _error(i2t, gradio_client.handle_file(str(many)))
  gallery, info = i2t(gradio_client.handle_file(_png(tmp_path / "wide.png", 40, 20)))
  assert "40x20; it was centre-cropped" in info and gallery[0]["caption"] is not None
  # files outside the upload folder are never read
  secret = root / "secret.png"
  shutil.copy(_png(tmp_path / "s.png", 16, 16), secret)
  for path in (str(secret), "/etc/hostname", server.upload_root + "/../../etc/hostname"):
    events = _raw_call(url, "i2t", [{"path": path, "meta": {"_type": "gradio.FileData"}},
                                    0, False, 3, 3.0, 1])
    assert "event: error" in events and "caption" not in events, events
  with pytest.raises(serve.BadInput, match="uploaded to this page"):
    server.prepare("i2t", image="/etc/hostname")
  # ... and the server still serves
  gallery, _ = _t2i(c, seed=1)
  assert len(gallery) == 1


# ---------------------------------------------------------------- a browser on the page

@pytest.mark.slow
def test_browser_generates_an_image_and_a_caption(served, tmp_path):
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                "chromium-driver; .ci/run installs them)")
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.common.by import By  # local: selenium is an optional extra
  from selenium.webdriver.support.ui import WebDriverWait  # local: selenium is an optional extra
  _, url, _ = served
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,900"):
    opts.add_argument(arg)
  driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=opts)
  wait = WebDriverWait(driver, 60)
  shots = os.environ.get("SERVE_SCREENSHOTS") or str(tmp_path)
  try:
    driver.get(url)
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#t2i-prompt textarea"))
    box.send_keys("a red circle on the left")
    driver.find_element(By.ID, "t2i-generate").click()
    img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#t2i-gallery img"))
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", img) > 0)
    wait.until(lambda d: "seed 1, sample 0" in d.find_element(By.ID, "t2i-gallery").text)
    assert "prompt: a red circle on the left" in driver.find_element(By.ID, "t2i-info").text
    driver.save_screenshot(os.path.join(shots, "serve_t2i.png"))
    # image to text: upload a picture, get its caption
    tab = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")
           if b.text.strip() == "Image to text"][0]
    tab.click()
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#i2t-image input[type=file]"))
    upload.send_keys(_png(tmp_path / "in.png", 24, 16))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#i2t-image img"))
    driver.find_element(By.ID, "i2t-generate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#i2t-gallery img"))
    wait.until(lambda d: "centre-cropped" in d.find_element(By.ID, "i2t-info").text)
    caption = driver.find_element(By.ID, "i2t-gallery").text.strip()
    assert caption, "the caption is shown under the image"
    driver.save_screenshot(os.path.join(shots, "serve_i2t.png"))
  finally:
    driver.quit()
