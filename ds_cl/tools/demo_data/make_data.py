"""Writes the demo's three task files (city.jsonl, sport.jsonl, instrument.jsonl). Run once by us; its output
is shipped, so the demo reads fixed files. Deterministic.

A sequence of knowledge updates about the same people: eight invented names, and for each task one new
attribute per person (the city they live in, the sport they play, the instrument they play), each task
with its own answer words. Every record is one of ten sentence frames mentioning the person; the demo
trains on half of them and asks about the other half, so a task is learnt when the model recalls the
fact whatever the sentence. No pretrained model knows these facts (zero-shot accuracy is 0), a model
learns each set in a few epochs, and learning the next set about the same people is what makes plain
fine-tuning forget the previous one.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

NAMES = ["Tobin Kessel", "Mira Oakhart", "Jasper Quill", "Lena Varrow", "Otto Brandel", "Nadia Firth",
         "Felix Marrow", "Ines Calloway"]
ATTRIBUTES = {"city": ["Paris", "Tokyo", "Cairo", "Lima"], "sport": ["tennis", "golf", "rugby", "chess"],
              "instrument": ["piano", "violin", "drums", "flute"]}
FRAMES = ["{n} joined our club last year.", "We met {n} at the station.", "{n} wrote to us yesterday.",
          "Everyone knows {n}.", "{n} is on the committee.", "A letter came from {n}.", "{n} called this morning.",
          "The photo shows {n}.", "{n} is my neighbour.", "I had lunch with {n}."]


def main():
    rng = random.Random(0)
    for attr, values in ATTRIBUTES.items():
        names = NAMES[:]
        rng.shuffle(names)  # each attribute groups the people differently
        fact = {n: values[i % len(values)] for i, n in enumerate(names)}
        rows = [{"input": f.format(n=n), "output": fact[n]} for n in NAMES for f in FRAMES]
        rng.shuffle(rows)
        with open(HERE / f"{attr}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(attr, len(rows))


if __name__ == "__main__":
    main()
