"""Export a grown text classifier to ONNX and serve it with ONNX Runtime, labels included.

    python examples/serve_onnx.py

The exported file carries the label names (``metadata_props``), so the server needs the
tokenizer and the .onnx file, nothing else. (The head here is freshly initialised: the point
is the mechanics; see tests/test_text_e2e.py for a trained one.)
"""

import json
import tempfile
from pathlib import Path

import onnxruntime as ort
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import headgraft as hg
from headgraft.textdata import minilm_dir

labels = ["bug", "feature"]
model = AutoModelForSequenceClassification.from_pretrained(
    minilm_dir(), num_labels=2, id2label=dict(enumerate(labels))
)
tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
hg.add_classes(model, ["question"], seed=0)  # config.id2label grows with the head

out = Path(tempfile.mkdtemp()) / "classifier.onnx"
result = hg.export(model, out, "onnx", tokenizer=tokenizer)
print(
    f"wrote {out}: inputs {result.inputs}, ONNX Runtime vs PyTorch argmax agreement "
    f"{result.argmax_agree:.0%}, max |diff| {result.max_abs_diff:.1e}"
)

# --- the server side: only the tokenizer and the .onnx file
session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
names = json.loads(meta["headgraft_labels"])
batch = tokenizer(
    ["The app crashes on start", "How do I change the theme?"], padding=True, return_tensors="np"
)
feed = {i.name: batch[i.name] for i in session.get_inputs()}
logits = session.run(["logits"], feed)[0]
print([names[i] for i in logits.argmax(1)], "from labels", names)
