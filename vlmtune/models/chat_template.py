"""The chat template vlmtune gives a model whose tokenizer has none (`templates/default.jinja`).

Each turn is `<|role|>\\n...` closed by the EOS token, so a trained model learns to stop; images
become the processor's image token where their content part stands.
"""

from importlib import resources

DEFAULT_CHAT_TEMPLATE = resources.files("vlmtune").joinpath("templates", "default.jinja").read_text().removesuffix("\n")
