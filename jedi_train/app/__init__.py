"""jedi-app: a Gradio web demo for an exported JeDiPipeline (cli/app.py starts it).

handler.py  the functions the page calls (references -> jedi-sample's generate -> gallery + zip)
examples.py bundled example subjects (procedural renders; DreamBench photos when ../shared has them)
ui.py       the page (gr.Blocks), wired to the handler, queued
"""
