"""The README's user-model example, imported by tests as `example_model:EchoModel`."""


class EchoModel:
    name = "echo"
    version = "1.0"
    input_schema = {"type": "number"}
    output_schema = {"type": "object", "properties": {"echo": {"type": "number"}}}

    def load(self):
        pass

    def predict_batch(self, inputs):
        return [{"echo": x} for x in inputs]


def not_a_model():
    return object()
