from bench.report import Outcome


def run(tiny: bool = False) -> Outcome:
    return Outcome("fanin", "todo", skipped="todo")
