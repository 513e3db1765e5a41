"""The lowvram-grpo web app: `python app.py` is the same as `lowvram-grpo ui`.

    python app.py                              # http://127.0.0.1:7860, this machine only
    python app.py --port 8000 --work-dir runs/app
    python app.py --host 0.0.0.0 --auth-file logins.txt  # reachable from the network, with a login
                                                         # (logins.txt: one user:password per line)
    python app.py --share --auth-file logins.txt         # plus a temporary public gradio.live link
    python app.py --allow-custom-code                  # allow uploading Python reward files
    python app.py --allow-code-execution               # offer code_tests (runs the model's code, sandboxed)
"""

import sys

from lowvram_grpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["ui", *sys.argv[1:]]))
