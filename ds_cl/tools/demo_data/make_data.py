"""Writes the demo's three task files (sentiment.jsonl, topic.jsonl, animal.jsonl) from the word lists
below. Run once by us; its output is shipped, so the demo reads fixed files. Deterministic.

Each task is a yes/no question whose answer is decided by one keyword of the input, so a tiny model
learns it in a few hundred steps: what the demo measures is how much of the earlier tasks survives
the later ones.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

SENT_POS = ["great", "lovely", "wonderful", "excellent", "delightful", "superb", "pleasant", "brilliant",
            "charming", "fantastic", "perfect", "friendly"]
SENT_NEG = ["awful", "terrible", "boring", "dreadful", "horrible", "rude", "poor", "dull", "nasty",
            "disappointing", "broken", "miserable"]
SENT_THINGS = ["the hotel", "the movie", "the meal", "the service", "the book", "the concert", "the staff",
               "the room", "the game", "the trip", "the show", "the coffee"]
SENT_FRAMES = ["{t} was {a}.", "I found {t} {a}.", "Honestly, {t} felt {a}.", "We thought {t} was {a} overall.",
               "In short: {a}, {t} was {a}."]

TOPICS = {
    "sports": ["football", "tennis", "the goalkeeper", "the marathon", "the referee", "a penalty", "the league",
               "the coach"],
    "science": ["the telescope", "a molecule", "the experiment", "the physicist", "a vaccine", "the laboratory",
                "an electron", "the fossil"],
    "food": ["the recipe", "a tomato", "the baker", "the soup", "fresh bread", "the chef", "a pancake",
             "the spices"],
    "music": ["the guitar", "a symphony", "the drummer", "the chorus", "a violin", "the melody", "the album",
              "the pianist"],
}
TOPIC_FRAMES = ["Yesterday {x} was in the news.", "Everyone talked about {x} today.", "A report about {x} appeared.",
                "People argued about {x} all week.", "The article described {x} in detail."]

ANIMALS = {
    "mammal": ["dog", "whale", "horse", "bat", "elephant", "tiger", "rabbit", "dolphin"],
    "bird": ["eagle", "sparrow", "penguin", "owl", "parrot", "swan", "crow", "pelican"],
    "fish": ["salmon", "shark", "trout", "tuna", "cod", "carp", "herring", "eel"],
}
ANIMAL_FRAMES = ["A {x} was seen near the river.", "The children watched a {x}.", "My neighbour saw a {x} today.",
                 "There is a {x} in the picture.", "We read a story about a {x}."]


def main():
    # Every task answers "yes" or "no": the tasks share their answer tokens, so forgetting shows as
    # the old task's rule being overwritten (accuracy falling towards the 50% of guessing), not as
    # the model no longer emitting a label word it was never asked for again.
    rng = random.Random(0)
    tasks = {}
    tasks["sentiment"] = [{"input": f.format(t=t, a=a), "output": "yes" if lab == "positive" else "no"}
                          for lab, adjs in (("positive", SENT_POS), ("negative", SENT_NEG)) for a in adjs
                          for t in SENT_THINGS for f in SENT_FRAMES[:4]]
    # topic: is the sentence about food or music (yes) rather than sports or science (no)?
    tasks["topic"] = [{"input": f.format(x=x), "output": "yes" if lab in ("food", "music") else "no"}
                      for lab, xs in TOPICS.items() for x in xs for f in TOPIC_FRAMES]
    # animal: is it a bird? Non-birds are drawn to match the birds' count.
    birds = [{"input": f.format(x=x), "output": "yes"} for x in ANIMALS["bird"] for f in ANIMAL_FRAMES]
    others = [{"input": f.format(x=x), "output": "no"} for lab in ("mammal", "fish") for x in ANIMALS[lab]
              for f in ANIMAL_FRAMES]
    tasks["animal"] = birds + rng.sample(others, len(birds))
    for name, rows in tasks.items():
        rng.shuffle(rows)
        with open(HERE / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
