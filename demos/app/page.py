"""The demo page: ``build_app(pipe)`` lays out the ``gr.Blocks`` around a pipeline, ``launch(app, ...)`` serves it."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from demos.app.backend import DemoBackend
from demos.app.render import CSS, LEGEND
from mmspec.config import MAX_DRAFT_TOKENS, MAX_TREE_NODES
from mmspec.drafters import tree_kinds
from mmspec.errors import MMSpecError

if TYPE_CHECKING:
    import gradio as gr

    from mmspec.pipeline import Pipeline

# mmspec.loading.ASSETS / "images", without importing torch for ``mmspec demo --help``
SAMPLE_IMAGES = Path(__file__).resolve().parents[2] / "assets" / "images"
DEFAULT_PROMPT = "Describe the image."
BUNDLED_NOTE = ("\n\n*The bundled models know only this repository's synthetic world of 1-4 coloured shapes on a "
                "3x3 grid (like the samples below): they describe such scenes and answer questions like \"What color "
                "is the circle?\", \"How many objects are there?\", \"Where is the red square?\", \"Is there a "
                "blue star?\"; on a photo, or asked anything else, their answer is meaningless.*")
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_CONCURRENCY = 16  # requests run at once, together in one batch per drafter kind (= Pipeline.default_batch_size)


def raw_image_input(**kwargs) -> gr.Image:
    """A ``gr.Image`` that hands the handler the uploaded file's path without opening it, so mmspec's own image
    validation turns a bad file into a readable message instead of Gradio failing before the handler runs.
    (An instance override rather than a subclass: Gradio writes a ``.pyi`` stub next to any module that
    subclasses a component.)"""
    import gradio as gr

    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    original = image.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "path", None) and not str(
                getattr(payload, "url", None) or "").startswith("data:"):
            return str(payload.path)
        return original(payload)

    image.preprocess = preprocess
    return image


def sample_examples(folder: Path = SAMPLE_IMAGES, limit: int = 16) -> list[list]:
    """``[[image_path], ...]`` for the bundled sample images (empty when there are none)."""
    if not folder.is_dir():
        return []
    return [[str(p)] for p in sorted(folder.glob("*.png"))[:limit]]


def build_app(pipe_or_factory: Pipeline | Callable[[], Pipeline], examples: list[list] | None = None,
              title: str = "mmspec: speculative decoding for VLMs", default_prompt: str = DEFAULT_PROMPT,
              default_max_new_tokens: int = 64) -> gr.Blocks:
    """The demo page around a ``Pipeline`` (or a zero-argument callable returning one, called here, once).

    ``examples``: ``[[image_path], ...]`` or ``[[image_path, prompt], ...]`` shown as clickable samples
    (default: the bundled ``assets/images/*.png``).
    The Send button calls ``app.mmspec_backend.chat`` (one turn of the conversation kept in a ``gr.State``);
    "New conversation" clears it. ``app.mmspec_backend.generate`` answers one request on its own.
    """
    import gradio as gr

    from mmspec.pipeline import BUNDLED_TARGET, Pipeline

    pipe = pipe_or_factory if isinstance(pipe_or_factory, Pipeline) else pipe_or_factory()
    backend = DemoBackend(pipe)
    max_new_limit = backend.max_new_tokens_limit
    if examples is None:
        examples = sample_examples()
    name_or_path = str(getattr(pipe.target.config, "_name_or_path", "") or "target")
    target_name = ("the bundled default (assets/models/target)" if Path(name_or_path) == BUNDLED_TARGET
                   else name_or_path if not Path(name_or_path).is_dir() else Path(name_or_path).name)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {html.escape(title)}\n"
                    f"Target VLM **{html.escape(target_name)}**, loaded drafter **{html.escape(pipe.drafter_kind)}** "
                    f"(pick another kind in the settings). "
                    "A small drafter guesses the next tokens; the VLM checks them all in one forward and keeps the "
                    "longest correct prefix plus one token of its own, so the answer is exactly the VLM's own."
                    + (BUNDLED_NOTE if Path(name_or_path) == BUNDLED_TARGET else ""))
        with gr.Row():
            with gr.Column(scale=1):
                image = raw_image_input(label="Image (optional: none asks text only; a new one joins the next turn)",
                                        sources=["upload", "clipboard"], elem_id="image-input", height=260)
                prompt = gr.Textbox(label="Prompt (follow-up questions keep the conversation)", value=default_prompt,
                                    lines=2, elem_id="prompt")
                with gr.Accordion("Settings", open=True):
                    kind = gr.Dropdown(backend.kinds, value=pipe.drafter_kind, label="Drafter kind",
                                       elem_id="drafter-kind")
                    adaptive = gr.Checkbox(True, elem_id="adaptive",
                                           label="Adaptive draft length (the engine picks it each round)")
                    k = gr.Slider(0, MAX_DRAFT_TOKENS, value=4, step=1, elem_id="num-draft",
                                  label="Draft tokens per round when not adaptive (0 = no drafting)")
                    tree = gr.Slider(0, MAX_TREE_NODES, value=0, step=1, elem_id="tree-nodes",
                                     label=f"Tree nodes per round (0 = a chain; {_listed(tree_kinds())} drafters)")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, elem_id="temperature",
                                            label="Temperature (0 = greedy)")
                    max_new = gr.Slider(1, max_new_limit, value=min(default_max_new_tokens, max_new_limit), step=1,
                                        label=f"Max new tokens (up to the target's context, {max_new_limit})",
                                        elem_id="max-new-tokens")
                    seed = gr.Number(value=0, precision=0, label="Seed (sampling only)", elem_id="seed")
                    compare = gr.Checkbox(False, label="Compare with plain decoding (measures the speedup)",
                                          elem_id="compare")
                with gr.Row():
                    button = gr.Button("Send", variant="primary", elem_id="generate")
                    reset = gr.Button("New conversation", elem_id="new-conversation")
                if examples:
                    with_prompts = any(len(e) > 1 for e in examples)
                    gr.Examples(examples=[list(e[:2]) if with_prompts else [e[0]] for e in examples],
                                inputs=[image, prompt] if with_prompts else [image], elem_id="examples",
                                label="Sample images (click one)", cache_examples=False, examples_per_page=16)
            with gr.Column(scale=2):
                error = gr.HTML("", elem_id="error-box")
                conversation = gr.HTML("", label="Conversation", elem_id="conversation")
                tokens = gr.HTML(LEGEND, label="Tokens, round by round", elem_id="tokens")
                final = gr.Textbox(label="Final text", elem_id="final-text", lines=3, interactive=False,
                                   buttons=["copy"])
                stats = gr.HTML("", label="Stats", elem_id="stats")
                table = gr.Dataframe(headers=["round", "draft", "accepted", "VLM token"], value=[],
                                     label="Rounds", elem_id="rounds", interactive=False, wrap=True, max_height=360)
        state = gr.State(None)
        button.click(backend.chat, inputs=[image, prompt, kind, k, temperature, max_new, compare, seed, tree, adaptive,
                                           state],
                     outputs=[tokens, table, stats, final, error, state, conversation], api_name="generate")
        reset.click(lambda: (None, "", LEGEND, [], "", "", ""), outputs=[state, conversation, tokens, table, stats,
                                                                       final, error], api_name="new_conversation")
    # several requests at once, so they share the engine's batch (``launch`` sets the limit from --concurrency)
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY)
    demo.mmspec_backend = backend
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, concurrency: int = DEFAULT_CONCURRENCY,
           block: bool = True, quiet: bool = False):
    """Queue (``concurrency`` requests at once, the rest wait in line) and serve ``demo``."""
    if concurrency < 1:
        raise MMSpecError(f"--concurrency must be at least 1, got {concurrency}")
    if not max_upload_mb > 0:
        raise MMSpecError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    demo.queue(default_concurrency_limit=concurrency, max_size=max(16, 8 * concurrency))
    allowed = [str(SAMPLE_IMAGES)] if SAMPLE_IMAGES.is_dir() else []
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                       max_file_size=int(max_upload_mb * 1024 * 1024), allowed_paths=allowed, css=CSS,
                       footer_links=[], quiet=quiet, show_error=False, inbrowser=False, ssr_mode=False)


def _listed(words: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return " and ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
