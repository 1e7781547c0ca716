"""The errors xllm raises for bad input.

Every problem with a file a user gave us becomes one `ModelFormatError` whose
message names the file and the problem (field, expected vs found), so the
command line can print it as one line instead of a traceback.
"""


class XllmError(Exception):
    """Base class of the errors xllm reports to a user as one line."""


class ModelFormatError(XllmError):
    """A model, checkpoint or tokenizer file is missing, truncated or not supported."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
