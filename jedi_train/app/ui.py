"""The page: references (upload or example) + prompts + settings -> gallery, references as seen, zip."""
from __future__ import annotations

import gradio as gr

from jedi_train import sampling as sample
from jedi_train.app.handler import MAX_IMAGES_PER_PROMPT, MAX_STEPS, JeDiApp

NO_EXAMPLE = ""
INTRO = ("Upload 1 to {k} photos of one subject (or pick an example), write one prompt per line, press "
         "**Generate**. Same sampler and defaults as `jedi-sample`; **Download all** gives the PNGs, the "
         "references, grid.png and settings.json that `jedi-sample` writes.")


def build_ui(app: JeDiApp, max_queue: int = 16) -> gr.Blocks:
    d = {**sample.DEFAULTS, **app.settings}  # the export's recommended settings where it has them
    scheduler_choices = [(f"pipeline's own ({type(app.base_scheduler).__name__})", "default"),
                         ("DDIM", "ddim"), ("DPM-Solver++", "dpm")]
    with gr.Blocks(title="JeDi: personalized text-to-image", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# JeDi: your subject in new scenes, no finetuning\n" + INTRO.format(k=app.max_refs))
        gr.Markdown(app.model_info(), elem_id="model-info")
        with gr.Row():
            with gr.Column():
                files = gr.File(label=f"Reference photos (1 to {app.max_refs})", file_count="multiple",
                                type="filepath", elem_id="refs")
                example = gr.Dropdown([("(my uploads)", NO_EXAMPLE), *[(n, n) for n in app.examples]],
                                      value=NO_EXAMPLE, label="or an example subject", elem_id="example")
                seen = gr.Gallery(label="References as the model sees them (cropped, resized)", columns=4,
                                  height=180, format="png", elem_id="seen")
                prompts = gr.Textbox(label="Prompts (one per line)", lines=3, elem_id="prompts",
                                     placeholder="a photo of a mug on the beach\na photo of a mug in the snow")
                with gr.Row():
                    num = gr.Slider(1, MAX_IMAGES_PER_PROMPT, value=1, step=1, label="Images per prompt",
                                    elem_id="num")
                    steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    guidance = gr.Slider(0, 20, value=d["guidance"], step=0.5, label="Text guidance",
                                         elem_id="guidance")
                    image_guidance = gr.Slider(0, 10, value=d["image_guidance"], step=0.5,
                                               label="Image guidance (0 = text only)", elem_id="image-guidance")
                with gr.Row():
                    scheduler = gr.Dropdown(scheduler_choices, value="default", label="Sampler", elem_id="scheduler")
                    seed = gr.Textbox(value=str(d["seed"]), label='Seed (an integer, or "random")', elem_id="seed")
                explain = gr.Checkbox(False, label="Explain: show where each result took its subject from "
                                      "(attention over each reference)", elem_id="explain")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Results", columns=4, format="png", elem_id="results")
                overlays = gr.Gallery(label="Where each result took its subject from (explain; brighter = more "
                                      "attention)", columns=4, height=180, format="png", elem_id="explained")
                status = gr.Markdown(elem_id="status")
                used = gr.Gallery(label="References the model used", columns=4, height=140, format="png",
                                  elem_id="used")
                download = gr.File(label="Download all (zip)", elem_id="download")

        def pick_example(name):
            if not name:
                return gr.update(), gr.update(), []
            ex = app.examples[name]
            return None, ex.prompts, app.preview([], name)

        quiet = {"show_progress": "hidden"}  # a failed preview: the error toast, no badge on every output
        example.change(pick_example, example, [files, prompts, seen], **quiet)
        files.upload(lambda f: (NO_EXAMPLE, app.preview(f)), files, [example, seen], **quiet)
        files.clear(list, None, seen, **quiet)
        go.click(app.generate, [files, example, prompts, num, steps, guidance, image_guidance, scheduler, seed, explain],
                 [gallery, used, download, status, overlays], concurrency_limit=1)
    return demo.queue(max_size=max_queue, default_concurrency_limit=1)
