"""Reference solutions for notebooks/14_prompt_engineering.ipynb."""


def reversal_prompt(word: str, operation: str) -> str:
    return f"Write each word backwards.\n{word} =>"


VERBALIZER = {"pos": "good", "neg": "bad"}  # the vague reviews' second label scheme in the corpus
