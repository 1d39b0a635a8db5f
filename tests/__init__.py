"""imagegen's tests.

Nothing reaches a model hub from them. huggingface_hub reads its offline switch once, when it
is first imported, so it is set here, before any test module or fixture can import it; the
environment fixture in ``conftest.py`` sets it again for every test's subprocesses.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
