import os

os.environ.setdefault("OPENAI_API_KEY", "unused")  # the openai client wants one even when unused
