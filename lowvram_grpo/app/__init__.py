"""The Gradio app: page layout (ui), its handlers, the Set-up form (setup), what it shows about
runs (dashboard), training jobs as subprocesses (jobs), and the models it holds for trying
adapters (playground) and rewards (workbench). Nothing outside this package imports it, but
the CLI's `ui` command, which launches it."""
