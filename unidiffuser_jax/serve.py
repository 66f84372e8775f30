"""`--mode=serve`: a web page (gradio) to try a model, served from the compiled samplers.

  python -m unidiffuser_jax.main --mode=serve --config=configs/demo.py --workdir=DIR \\
      --flagfile=DIR/demo.flags          # the demo's workdir; or --config.sample.checkpoint=...

One tab per generation mode in config.serve.tasks (sample.TASKS: text to image, image to
text, joint, image variation i2t2i, text variation t2i2t, interpolation), each with seed
("random" draws one and shows it), steps (config.serve.steps), guidance scale and number of
samples. Requests go through serve_queue.Batcher: concurrent requests of one (task, steps)
share the compiled config.serve.batch_size batch (padded; nothing compiles per request), and
sample j of a request with seed s is keyed (s, j) exactly as `--mode=sample
--config.sample.seed=s` keys its sample j, so an image does not depend on its batch-mates.
Every (task, steps) program is built (and run once) at start-up, by the queue's worker while
the page is already up (requests wait for it). The guidance scale is an input of the
program, not a constant in it.

Results: a gallery with captions; each PNG (under config.serve.output_dir) carries its
generation parameters in text chunks, also shown on the page. Progress is the count of network
evaluations (a jax.debug.callback in the sampler), and Stop cancels a request.

Bad input gets one clear line on the page and never reaches the model: empty prompts; prompts
over max_prompt_chars or the model's token length (cut, with a notice); uploads that are not
images, over max_upload_mb or max_image_pixels; non-square images (centre-cropped, with a
notice); numbers out of range. Uploads are read only from gradio's upload folder.
"""
import asyncio
import base64
import dataclasses
import io
import json
import math
import os
import secrets
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls

import gradio as gr  # noqa: E402  (after switching off its analytics)
import numpy as np  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402

from data_pipelines import transforms  # noqa: E402
from unidiffuser_jax import serve_queue, sample  # noqa: E402
from unidiffuser_jax.diffusion import solvers  # noqa: E402
from unidiffuser_jax.errors import ConfigError  # noqa: E402

# task -> (tab title, what it does); the order of the tabs.
TABS = {
    "t2i": ("Text to image", "An image for a prompt."),
    "i2t": ("Image to text", "A caption for an image."),
    "joint": ("Joint", "An image and its caption, from nothing."),
    "i2t2i": ("Image variation", "Caption the image, then draw the caption (i2t2i)."),
    "t2i2t": ("Text variation", "Draw the prompt, then caption the drawing (t2i2t)."),
    "interpolate": ("Interpolation", "Images between two uploaded images."),
}
MAX_SEED = 2**31 - 1


class BadInput(ValueError):
  """A request the server refuses, with the line the page shows."""


@dataclasses.dataclass
class Prepared:
  """A checked request: its samples (run_batch's entries) and what the page says about it."""
  task: str
  steps: int
  samples: list
  params: dict
  notices: list


# ---------------------------------------------------------------- checking the inputs

def check_prompt(prompt, sv, tokenizer, max_length: int, notices: list) -> str:
  if not isinstance(prompt, str) or not prompt.strip():
    raise BadInput("Enter a prompt: it is empty.")
  prompt = " ".join(prompt.split())
  limit = int(sv.max_prompt_chars)
  if len(prompt) > limit:
    prompt = prompt[:limit]
    notices.append(f"The prompt was cut to its first {limit} characters.")
  n = len(tokenizer(prompt)["input_ids"])
  if n > max_length:
    notices.append(f"The prompt is {n} tokens long; the model reads the first {max_length} "
                   f"(the rest is ignored).")
  return prompt


def check_image(upload, sv, what: str, upload_root: str, notices: list) -> bytes:
  """An upload (a path in gradio's upload folder, or a data: URL) -> its checked bytes."""
  if upload is None or upload == "":
    raise BadInput(f"Upload {what}.")
  limit = int(float(sv.max_upload_mb) * (1 << 20))
  if isinstance(upload, str) and upload.startswith("data:"):
    head, _, b64 = upload.partition(",")
    if len(b64) * 3 // 4 > limit:
      raise BadInput(f"{what.capitalize()} is larger than the {sv.max_upload_mb} MB limit.")
    try:
      data = base64.b64decode(b64, validate=True) if head.endswith(";base64") else b""
    except ValueError:
      data = b""
  else:
    path = os.path.realpath(str(upload))
    if os.path.commonpath([path, upload_root]) != upload_root or not os.path.isfile(path):
      raise BadInput(f"{what.capitalize()} must be uploaded to this page.")
    if os.path.getsize(path) > limit:
      raise BadInput(f"{what.capitalize()} is larger than the {sv.max_upload_mb} MB limit.")
    with open(path, "rb") as f:
      data = f.read(limit + 1)
  try:
    _, (w, h) = transforms.decode_image(data, max_pixels=int(sv.max_image_pixels))
  except transforms.SkipRecord as e:
    if e.reason == "image_too_large":
      raise BadInput(f"{what.capitalize()} has too many pixels ({e.detail}); the limit is "
                     f"{int(sv.max_image_pixels)}.") from None
    raise BadInput(f"{what.capitalize()} is not an image this server can read "
                   f"(PNG, JPEG, WebP, ...).") from None
  if w != h:
    notices.append(f"{what.capitalize()} is {w}x{h}; it was centre-cropped to a square.")
  return data


def _number(value, name: str, lo, hi, integer: bool):
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise BadInput(f"{name} must be a number, got {value!r}.") from None
  if not math.isfinite(x) or not lo <= x <= hi or (integer and x != int(x)):
    kind = "a whole number" if integer else "a number"
    raise BadInput(f"{name} must be {kind} from {lo} to {hi}, got {value!r}.")
  return int(x) if integer else x


# ---------------------------------------------------------------- the server

class Server:
  """The loaded model, its compiled programs, the queue, and the checks in front of it."""

  def __init__(self, config, workdir: str):
    self.config, sv = config, config.serve
    self.tasks = tuple(sv.tasks)
    for task in self.tasks:
      if task not in TABS:
        raise ConfigError(f"config.serve.tasks: {task!r} has no page; choose from {tuple(TABS)}")
    self.steps_choices = tuple(int(x) for x in sv.steps) or (int(config.sample.steps),)
    self.batch_size = int(sv.batch_size)
    if not 1 <= int(sv.max_samples) <= self.batch_size:
      raise ConfigError(f"config.serve.max_samples={sv.max_samples} must be 1.."
                        f"config.serve.batch_size ({self.batch_size})")
    self._configs = {}
    for steps in self.steps_choices:
      try:
        solvers.check_args(steps, int(config.sample.order), config.sample.method,
                           config.sample.skip_type)
      except ValueError as e:
        raise ConfigError(f"config.serve.steps: {e}") from None
      c = config.copy_and_resolve_references()
      c.sample.steps, c.sample.batch_size = steps, self.batch_size
      self._configs[steps] = c
    self.out_dir = os.path.abspath(sv.output_dir or os.path.join(workdir, "serve"))
    os.makedirs(self.out_dir, exist_ok=True)
    self.upload_root = os.path.realpath(gr.utils.get_upload_folder())
    self.model_name = config.sample.checkpoint or workdir
    self._sampler = sample.load_sampler(self._configs[self.steps_choices[0]], workdir)
    self._evals, self._calls, self._calls_lock, self.compile_seconds = {}, 0, threading.Lock(), {}
    self.programs = [(t, n) for n in reversed(self.steps_choices) for t in self.tasks]
    self.ready = threading.Event()   # set once every program is built
    self.batcher = serve_queue.Batcher(self._run_batch, self.batch_size,
                                       float(sv.max_wait_ms) / 1e3, int(sv.max_queued_samples),
                                       start=self._warm_up)

  # -- the compiled programs

  def _on_eval(self, t_img, t_text):   # called by the sampler at every network evaluation
    del t_img, t_text                   # (from XLA's threads, one per device)
    with self._calls_lock:
      self._calls += 1

  def _warm_up(self) -> None:
    """Builds (and runs once) every (task, steps) program, the default steps first, and counts
    its network evaluations; run by the queue's worker while the page is already up."""
    probe = _png_bytes(np.full((8, 8, 3), 128, np.uint8))
    for task, steps in self.programs:
      t0, self._calls = time.perf_counter(), 0
      self._generate(task, steps, [dict(prompt="warm up", image=probe, image2=probe, seed=0,
                                        index=0, guidance=1.0)])
      self._evals[(task, steps)] = max(self._calls, 1)
      self.compile_seconds[f"{task}/{steps}"] = dt = round(time.perf_counter() - t0, 2)
      print(f"serve: compiled {task} with {steps} steps in {dt} s", flush=True)
    self.ready.set()

  def _generate(self, task, steps, samples: list) -> list[dict]:
    needs = sample.TASKS[task].inputs
    host = dict(seeds=[s["seed"] for s in samples], sample_ids=[s["index"] for s in samples],
                guidance=[s["guidance"] for s in samples])
    if "prompts" in needs:
      host["prompts"] = [s["prompt"] for s in samples]
    if "images" in needs or "image_pairs" in needs:
      host["images"] = [s["image"] for s in samples]
      host["image_names"] = [None] * len(samples)
    if "image_pairs" in needs:
      host["images2"] = [s["image2"] for s in samples]
      host["image2_names"] = [None] * len(samples)
    return sample.generate(task, host, len(samples), self._configs[steps], progress=False,
                           on_eval=self._on_eval, **self._sampler)

  def _run_batch(self, group, requests) -> None:
    task, steps = group
    self._calls = 0
    samples = [s for r in requests for s in r.samples]
    records = iter(self._generate(task, steps, samples))
    for r in requests:
      r.records = [next(records) for _ in r.samples]

  def progress(self, req) -> tuple[int, int]:
    """(network evaluations done, of) for a running request's batch."""
    n = self._evals[req.group]
    return min(self._calls, n), n

  # -- requests

  def prepare(self, task, prompt=None, image=None, image2=None, seed=0, randomize=False,
              steps=None, guidance=None, num=1) -> Prepared:
    """The page's inputs -> a checked request; raises BadInput with the page's message."""
    if task not in self.tasks:
      raise BadInput(f"This server does not offer {task!r}.")
    sv, s, notices = self.config.serve, self.config.sample, []
    steps = self.steps_choices[0] if steps is None else _number(steps, "Steps", 1, 10**4, True)
    if steps not in self.steps_choices:
      raise BadInput(f"Steps must be one of {list(self.steps_choices)}, got {steps}.")
    guidance = sample.guidance_scale(s, task) if guidance is None else guidance
    guidance = _number(guidance, "Guidance scale", 0.0, float(sv.max_guidance), False)
    num = _number(num, "Number of samples", 1, int(sv.max_samples), True)
    seed = secrets.randbelow(MAX_SEED + 1) if randomize else _number(seed, "Seed", 0, MAX_SEED,
                                                                     True)
    needs = sample.TASKS[task].inputs
    base = dict(seed=seed, guidance=guidance)
    if "prompts" in needs:
      base["prompt"] = check_prompt(prompt, sv, self._sampler["tokenizer"],
                                    int(self.config.data.max_length), notices)
    if "images" in needs or "image_pairs" in needs:
      base["image"] = check_image(image, sv, "the image" if "images" in needs else
                                  "the first image", self.upload_root, notices)
    if "image_pairs" in needs:
      base["image2"] = check_image(image2, sv, "the second image", self.upload_root, notices)
    params = dict(task=task, seed=seed, steps=steps, guidance_scale=guidance, samples=num,
                  solver=f"{s.method} order {s.order}", model=self.model_name)
    if "prompt" in base:
      params["prompt"] = base["prompt"]
    if task == "interpolate":
      params["guidance_scale"] = 0.0   # the interpolation's own setting (sample._interpolate)
    return Prepared(task, steps, [dict(base, index=j) for j in range(num)], params, notices)

  def submit(self, prep: Prepared) -> serve_queue.Request:
    try:
      return self.batcher.submit((prep.task, prep.steps), prep.samples)
    except serve_queue.QueueFull as e:
      raise BadInput(f"{str(e).capitalize()}.") from None

  def results(self, prep: Prepared, req) -> tuple[list, str]:
    """A finished request -> (gallery [(png path, caption)], the page's parameter text)."""
    gallery = []
    for j, (s, rec) in enumerate(zip(prep.samples, req.records)):
      params = dict(prep.params, sample=j, seed=s["seed"])
      caption = rec.get("caption")
      if caption is not None:
        params["caption"] = caption
      if "pixels" in rec:
        pix = rec["pixels"]
        frames = pix if pix.ndim == 4 else [pix]
        for r, im in enumerate(frames):
          label = (f"w = {r / (len(frames) - 1):.2f}" if pix.ndim == 4 else
                   caption or f"seed {s['seed']}, sample {j}")
          extra = {"point": f"{r} of {len(frames)}"} if pix.ndim == 4 else {}
          gallery.append((self._save(im, dict(params, **extra), req.id, j, r), label))
      else:   # a caption of an input image: show the (centre-cropped) input with it
        img, _ = transforms.decode_image(s["image"],
                                         max_pixels=int(self.config.serve.max_image_pixels))
        im = np.asarray(transforms.center_square(img).convert("RGB"))
        gallery.append((self._save(im, params, req.id, j, 0), caption))
    waited = req.started - req.created
    ran = req.finished - req.started
    lines = [f"**{TABS[prep.task][0]}**: " + ", ".join(
        f"{k} {v}" for k, v in prep.params.items() if k not in ("task", "prompt", "model"))]
    if "prompt" in prep.params:
      lines.append(f"prompt: {prep.params['prompt']}")
    lines.append(f"model: {self.model_name}")
    lines.append(f"queued {waited:.2f} s, generated in {ran:.2f} s in a batch of "
                 f"{req.batch_requests} request(s); the parameters are in each PNG's text chunks")
    lines += [f"Note: {n}" for n in prep.notices]
    return gallery, "\n\n".join(lines)

  def _save(self, pixels, params: dict, rid: int, j: int, r: int) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(params))
    for k, v in params.items():
      info.add_itxt(k, str(v))
    path = os.path.join(self.out_dir, f"{int(time.time())}_{rid:06d}_{j}_{r}.png")
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, pnginfo=info)
    return path

  def close(self) -> None:
    self.batcher.close()


def _png_bytes(pixels) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


# ---------------------------------------------------------------- the page

def _upload(label: str, elem_id: str) -> gr.Image:
  """An image upload whose file the handler receives undecoded: the server checks it (so a
  non-image gets the server's message, not a decoding error) and reads only gradio's upload
  folder. (An instance override: a gr.Image subclass would make gradio write a .pyi here.)"""
  image = gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], height=240,
                   elem_id=elem_id)

  def undecoded(payload):
    if payload is None:
      return None
    if payload.url and payload.url.startswith("data:"):
      return payload.url
    return payload.path
  image.preprocess = undecoded
  return image


def _handler(server: Server, task: str):
  async def generate(prompt, image, image2, seed, randomize, steps, guidance, num,
                     progress=gr.Progress()):
    try:
      prep = server.prepare(task, prompt, image, image2, seed, randomize, steps, guidance, num)
      for n in prep.notices:
        gr.Warning(n)
      req = server.submit(prep)
    except BadInput as e:
      raise gr.Error(str(e)) from None
    deadline = time.monotonic() + float(server.config.serve.request_timeout_s)
    loop, finished = asyncio.get_running_loop(), asyncio.Event()
    req.on_done.append(lambda: loop.call_soon_threadsafe(finished.set))
    if req.done.is_set():
      finished.set()
    shown = None
    try:
      while not finished.is_set():
        if time.monotonic() > deadline:
          server.batcher.cancel(req)
          raise gr.Error("The request timed out; try again with fewer samples or steps.")
        if len(server._evals) < len(server.programs):
          now = ((len(server._evals), len(server.programs)),
                 "the server is compiling its programs (once, at start-up)", "programs")
        elif req.started is None:
          now = (0.0, f"waiting for a batch ({server.batcher.queued_ahead(req)} samples ahead)",
                 "steps")
        else:
          k, n = server.progress(req)
          now = ((k, n), f"denoising: step {k} of {n}", "steps")
        if now != shown:   # a message only when it changes
          progress(now[0], desc=now[1], unit=now[2])
          shown = now
        try:   # wakes as soon as the request is done; else looks again in 0.1 s
          await asyncio.wait_for(finished.wait(), 0.1)
        except TimeoutError:
          pass
    except asyncio.CancelledError:
      server.batcher.cancel(req)
      raise
    if req.error:
      raise gr.Error(req.error)
    if req.cancelled:
      raise gr.Error("Cancelled.")
    return server.results(prep, req)
  generate.__name__ = task
  return generate


def build_page(server: Server) -> gr.Blocks:
  sv, s = server.config.serve, server.config.sample
  with gr.Blocks(title="UniDiffuser") as page:
    gr.Markdown(f"# UniDiffuser\nOne model, every direction between images and text. "
                f"Model: `{server.model_name}`.")
    with gr.Tabs():
      for task in server.tasks:
        title, what = TABS[task]
        needs = sample.TASKS[task].inputs
        with gr.Tab(title, id=task):
          gr.Markdown(what)
          with gr.Row():
            with gr.Column():
              none = gr.State(None)
              prompt = (gr.Textbox(label="Prompt", lines=2, max_length=int(sv.max_prompt_chars),
                                   elem_id=f"{task}-prompt")
                        if "prompts" in needs else none)
              image, image2 = none, none
              if "images" in needs or "image_pairs" in needs:
                image = _upload("Image" if "images" in needs else "First image",
                                f"{task}-image")
              if "image_pairs" in needs:
                image2 = _upload("Second image", f"{task}-image2")
              with gr.Row():
                seed = gr.Number(label="Seed", value=int(s.seed), precision=0, minimum=0,
                                 maximum=MAX_SEED)
                randomize = gr.Checkbox(label="Random seed", value=False)
              with gr.Row():
                steps = gr.Dropdown(label="Steps", choices=list(server.steps_choices),
                                    value=server.steps_choices[-1])
                num = (gr.Slider(label="Samples", minimum=1, maximum=int(sv.max_samples),
                                 step=1, value=1) if int(sv.max_samples) > 1 else
                       gr.Number(label="Samples", value=1, precision=0, minimum=1, maximum=1,
                                 interactive=False))
              guidance = gr.Slider(label="Guidance scale", minimum=0.0,
                                   maximum=float(sv.max_guidance), step=0.5,
                                   value=sample.guidance_scale(s, task),
                                   interactive=task != "interpolate")
              with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id=f"{task}-generate")
                stop = gr.Button("Stop", elem_id=f"{task}-stop")
            with gr.Column():
              gallery = gr.Gallery(label="Results", columns=2, format="png", height=420,
                                   preview=False, object_fit="contain", fit_columns=False,
                                   elem_id=f"{task}-gallery")
              info = gr.Markdown(elem_id=f"{task}-info")
          inputs = [prompt, image, image2, seed, randomize, steps, guidance, num]
          events = [go.click(_handler(server, task), inputs, [gallery, info], api_name=task,
                             concurrency_limit=None)]
          if prompt is not none:   # Enter in the prompt generates too
            events.append(prompt.submit(_handler(server, task), inputs, [gallery, info],
                                        api_visibility="private", concurrency_limit=None))
          stop.click(None, None, None, cancels=events, api_visibility="private")
  return page


def launch(server: Server, page: gr.Blocks, *, block: bool = True):
  """Serves `page` on config.serve.host:port (127.0.0.1 unless configured)."""
  sv = server.config.serve
  page.queue(default_concurrency_limit=None, max_size=int(sv.max_queued_samples))
  return page.launch(server_name=sv.host, server_port=int(sv.port), share=False,
                     max_file_size=f"{int(float(sv.max_upload_mb) * 1024)}kb",
                     allowed_paths=[server.out_dir], show_error=False, ssr_mode=False,
                     prevent_thread_lock=not block, quiet=not block, css=_css(server.config))


def _css(config) -> str:
  """Small images (the demo's 16 px) are shown as sharp pixels, not a blur."""
  if int(config.data.resolution) >= 128:
    return ""
  return "[id$='-gallery'] img, [id$='-image'] img, [id$='-image2'] img " \
         "{ image-rendering: pixelated; }"


def run(config, workdir: str) -> None:
  server = Server(config, workdir)
  page = build_page(server)
  print(f"serve: http://{config.serve.host}:{config.serve.port}/  (Ctrl-C stops)", flush=True)
  try:
    launch(server, page)
  finally:
    server.close()
