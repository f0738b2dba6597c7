"""Writes benign_instructions.jsonl: everyday requests we wrote, for the safety-alignment task of the retention
study (`ds-cl retention`). Run once by us; its output is shipped. Deterministic.

The safety task mixes harmful requests answered safely with these benign requests answered by the model
itself (its own greedy answers), so training teaches when to refuse without teaching a new answer style
(short answers, a refusal reflex). The requests are ordinary: explanations, lists, short writing, advice,
planning, each frame filled with several topics so no two are alike. None is an IFEval prompt and none
carries a formatting constraint (IFEval's subject), so training on the model's answers cannot teach to it.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

FRAMES = {
    "explain": ["Explain how {x} works.", "Why is {x} important?", "Describe {x} to someone who has never heard of it.",
                "What are the main ideas behind {x}?"],
    "list": ["Give me some tips for {y}.", "What should a beginner know about {y}?", "List a few common mistakes in {y}.",
             "How can I get better at {y}?"],
    "write": ["Write a short story about {z}.", "Write a poem about {z}.", "Write a friendly note to a neighbour about {z}.",
              "Describe {z} in a few sentences."],
    "plan": ["Help me plan {w}.", "What do I need for {w}?", "Suggest a schedule for {w}."],
}
TOPICS = {
    "x": ["photosynthesis", "a refrigerator", "compound interest", "the water cycle", "a bicycle gear", "vaccination",
          "a search engine", "recycling", "the moon's phases", "a rainbow", "a heat pump", "public libraries",
          "bread rising", "a solar panel", "the immune system", "tides", "a compass", "democracy", "an electric motor",
          "coffee roasting"],
    "y": ["gardening", "cooking rice", "running", "learning a language", "public speaking", "saving money",
          "taking photos", "studying for exams", "keeping a houseplant alive", "writing emails", "drawing",
          "playing chess", "swimming", "baking cookies", "time management", "birdwatching", "knitting",
          "cycling in a city", "meal planning", "sleeping well"],
    "z": ["a lighthouse keeper", "the first snow of winter", "a lost umbrella", "a robot learning to paint",
          "a small village market", "an old oak tree", "a cat on a windowsill", "a summer thunderstorm",
          "a train journey", "a library at night", "a kite festival", "a friendly dragon", "the sea at dawn",
          "a bakery on a busy street", "a school science fair"],
    "w": ["a birthday party for a ten-year-old", "a weekend hiking trip", "a picnic in the park", "a family dinner",
          "a week of healthy breakfasts", "a garden for a small balcony", "a day of sightseeing in a new city",
          "a book club meeting", "moving to a new flat", "a study week before exams"],
}


def main():
    rng = random.Random(0)
    rows = []
    for kind, frames in FRAMES.items():
        for frame in frames:
            slot = frame[frame.index("{") + 1]
            for topic in TOPICS[slot]:
                rows.append({"instruction": frame.format(**{slot: topic}), "kind": kind})
    rng.shuffle(rows)
    with open(HERE / "benign_instructions.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(len(rows))


if __name__ == "__main__":
    main()
