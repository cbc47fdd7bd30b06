import pytest

from labkit import data
from labkit.tokenizer import CharTokenizer


def test_generation_is_deterministic_for_a_seed():
    assert data.corpus(20_000, seed=3) == data.corpus(20_000, seed=3)
    assert data.corpus(20_000, seed=3) != data.corpus(20_000, seed=4)
    a = data.examples("arithmetic", "vague", 4, n=20, seed=7)
    assert a == data.examples("arithmetic", "vague", 4, n=20, seed=7)


def test_task_suite_shapes():
    assert data.tasks() == ["translate", "sentiment", "arithmetic", "capital", "string"]
    for task in data.tasks():
        for fmt in data.FORMATS:
            for shots in (0, 3, 8):
                ex = data.examples(task, fmt, shots, n=5)[0]
                lines = ex.prompt.split("\n")
                header = 0 if fmt == "vague" else 1
                assert len(lines) == header + shots + 1
                assert lines[-1].endswith(data.SEPARATOR[fmt])
                assert ex.answer and "\n" not in ex.answer


def test_demonstrations_never_contain_the_query():
    for ex in data.examples("capital", "specific", 8, n=50):
        query = ex.prompt.split("\n")[-1].split(" =>")[0]
        demos = [line.split(" =>")[0] for line in ex.prompt.split("\n")[1:-1]]
        assert query not in demos


def test_answers_are_right():
    fr = dict(data.words()["en_fr"])
    for ex in data.examples("translate", "specific", 0, n=30):
        assert fr[ex.prompt.split("\n")[-1].removesuffix(" =>")] == ex.answer
    for ex in data.examples("arithmetic", "specific", 0, n=30):
        a, op, b = ex.prompt.split("\n")[-1].removesuffix(" =>").split()
        assert int(ex.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_everything_fits_the_context_and_the_alphabet():
    tok = CharTokenizer()
    longest = 0
    for task in data.tasks():
        for fmt in data.FORMATS:
            for ex in data.examples(task, fmt, 8, n=100):
                longest = max(longest, len(tok.encode(ex.text)))
    assert longest <= 512
    tok.encode(data.corpus(50_000))


def test_tokenizer_round_trip():
    tok = CharTokenizer()
    text = "Bonjour! château, cœur, 12 + 7 => 19\nnew line"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.tensor(text)[0]) == text
    with pytest.raises(ValueError, match="not in the tokenizer's alphabet"):
        tok.encode("emoji \U0001f600")
    with pytest.raises(ValueError, match="outside the alphabet"):
        tok.decode([tok.vocab_size])


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="unknown task"):
        data.examples("poetry")
    with pytest.raises(ValueError, match="unknown format"):
        data.examples("capital", "polite")
    with pytest.raises(ValueError, match="shots must be"):
        data.examples("capital", "vague", 9)
    with pytest.raises(ValueError, match="n_chars"):
        data.corpus(0)
