"""The one error type for user mistakes.

Everything a caller can fix (a bad argument, an unreadable image, an unknown run) raises `InputError`,
which names the offending field. The DEEPaaS adapter turns it into an HTTP 4xx and the CLI into exit
status 2; any other exception is a server fault. It must survive pickling, because DEEPaaS runs
predict and train in worker processes.
"""


class InputError(ValueError):
    """A problem with one input that the caller can fix.

    Args:
        field: name of the argument (or input) at fault, as the caller knows it.
        problem: what is wrong with it, including the value received where useful.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field = field
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.field}: {self.problem}"
