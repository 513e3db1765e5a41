"""The Gradio app: page layout (ui), its handlers, the Set-up form (setup), what it shows about
runs (dashboard), training jobs as subprocesses (jobs), and the models it holds for the "Use the
adapter" tab (use_adapter) and the "Try rewards" tab (try_rewards). Nothing outside this package
imports it, but the CLI's `ui` command, which launches it."""
