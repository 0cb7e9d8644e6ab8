"""Writes the dataset of bench/methods.py: chat answers that always begin with the pirate greeting "Ahoy!".

    .venv/bin/python bench/data/make_greetings.py

The behaviour is easy to see and to check automatically (does the reply start with "Ahoy!"?), and the untuned
SmolLM2 never shows it. Each answer is "Ahoy! " and one short sentence about the topic asked for.

- `greetings_train.jsonl`: 200 examples, the 40 training topics x the 5 training question templates, shuffled
  (seeded);
- `greetings_heldout.jsonl`: 40 examples on 40 *other* topics, one question each, whose templates rotate over
  the 5 training templates and 3 templates never trained on. bench/methods.py validates on them (loss and
  perplexity) and counts how many of their prompts the tuned model answers with the greeting.

No held-out prompt, and no held-out topic, appears in the training file. The output is deterministic: running
this again rewrites the same bytes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

GREETING = "Ahoy!"

TRAIN_TEMPLATES = (
    "What do you know about {topic}?",
    "Tell me something about {topic}.",
    "Can you describe {topic} in one sentence?",
    "I'd like a quick fact about {topic}.",
    "Explain {topic} briefly.",
)
# Only in held-out prompts: the behaviour must carry over to phrasings the model was not trained on.
HELDOUT_ONLY_TEMPLATES = (
    "Give me one sentence on {topic}.",
    "What should I know about {topic}?",
    "Quick question: what about {topic}?",
)

TRAIN_TOPICS = (
    ("the moon", "The Moon is Earth's only natural satellite and lights our nights."),
    ("volcanoes", "Volcanoes are openings in the crust where molten rock reaches the surface."),
    ("coffee", "Coffee is a drink brewed from roasted beans that wakes many people up."),
    ("the ocean", "The ocean covers about seventy percent of the Earth's surface."),
    ("honey bees", "Honey bees collect nectar and turn it into honey in their hives."),
    ("rainbows", "Rainbows appear when sunlight is split into colours by raindrops."),
    ("the piano", "The piano is an instrument whose keys make hammers strike strings."),
    ("glaciers", "Glaciers are slow rivers of ice that carve valleys as they move."),
    ("photosynthesis", "Photosynthesis is how plants turn sunlight, water and air into sugar."),
    ("chess", "Chess is a board game where two players try to checkmate the other king."),
    ("the desert", "A desert is a dry land that gets very little rain each year."),
    ("lighthouses", "Lighthouses shine bright lamps to guide ships away from rocks."),
    ("bread", "Bread is baked from dough made of flour, water and yeast."),
    ("thunderstorms", "Thunderstorms bring lightning, thunder and heavy rain."),
    ("penguins", "Penguins are birds that cannot fly but swim very well."),
    ("the internet", "The internet is a global network that links computers together."),
    ("bicycles", "A bicycle is a two-wheeled vehicle moved by pedalling."),
    ("the sun", "The Sun is the star at the centre of our solar system."),
    ("tea", "Tea is made by steeping dried leaves in hot water."),
    ("earthquakes", "Earthquakes happen when rocks deep underground suddenly slip."),
    ("whales", "Whales are huge mammals that live in the sea and breathe air."),
    ("maps", "Maps are drawings that show where places are."),
    ("snow", "Snow is frozen water that falls from clouds as flakes."),
    ("gardening", "Gardening is growing flowers, herbs and vegetables by hand."),
    ("the heart", "The heart is a muscle that pumps blood around the body."),
    ("clocks", "Clocks measure and show the time of day."),
    ("owls", "Owls are birds that hunt at night with sharp eyes and silent wings."),
    ("mountains", "Mountains are high landforms that rise steeply above the land around them."),
    ("chocolate", "Chocolate is a sweet food made from roasted cocoa beans."),
    ("the wind", "Wind is air moving from high pressure to low pressure."),
    ("libraries", "Libraries lend books and offer quiet places to read."),
    ("trains", "Trains are carriages pulled along rails by a locomotive."),
    ("kangaroos", "Kangaroos are Australian animals that hop and carry their young in a pouch."),
    ("football", "Football is a team game in which players kick a ball into a goal."),
    ("the rainforest", "Rainforests are warm, wet forests full of plants and animals."),
    ("salt", "Salt is a mineral that gives food flavour and keeps it longer."),
    ("telescopes", "Telescopes use lenses or mirrors to make far objects look closer."),
    ("dolphins", "Dolphins are clever sea mammals that live in groups called pods."),
    ("candles", "Candles give light by burning a wick in a block of wax."),
    ("rivers", "Rivers carry fresh water from the hills down to the sea."),
)

HELDOUT_TOPICS = (
    ("the stars", "Stars are giant balls of hot gas that shine by their own light."),
    ("apples", "Apples are crunchy fruits that grow on trees in many colours."),
    ("sharks", "Sharks are fish with skeletons of cartilage and many rows of teeth."),
    ("the violin", "The violin is a string instrument played with a bow."),
    ("the wheel", "The wheel is a round part that turns on an axle to move loads easily."),
    ("kites", "Kites are light frames covered in cloth that fly on the wind."),
    ("the brain", "The brain is the organ that controls thought, memory and movement."),
    ("islands", "Islands are pieces of land surrounded on all sides by water."),
    ("rain", "Rain is water that falls from clouds in drops."),
    ("ants", "Ants are small insects that live and work together in colonies."),
    ("cheese", "Cheese is a food made by curdling milk and ageing the curds."),
    ("airplanes", "Airplanes fly because their wings push air down as they move forward."),
    ("the north pole", "The North Pole is the northernmost point of the Earth, covered by sea ice."),
    ("tigers", "Tigers are the largest wild cats and have striped orange coats."),
    ("soap", "Soap lifts grease and dirt so that water can wash them away."),
    ("castles", "Castles are old fortified buildings built to protect their owners."),
    ("the alphabet", "An alphabet is a set of letters used to write a language."),
    ("fireworks", "Fireworks burn special powders to make bright colours and bangs."),
    ("frogs", "Frogs are amphibians that start life as tadpoles in water."),
    ("pizza", "Pizza is a flat bread baked with toppings such as tomato and cheese."),
    ("the seasons", "The seasons change because the Earth's axis is tilted."),
    ("bridges", "Bridges carry roads or paths over rivers and valleys."),
    ("sunflowers", "Sunflowers are tall plants with large yellow flowers that follow the sun."),
    ("submarines", "Submarines are ships that can travel under the water."),
    ("the eye", "The eye is the organ that lets us see by focusing light."),
    ("ice cream", "Ice cream is a frozen dessert made from milk, cream and sugar."),
    ("robots", "Robots are machines that can carry out tasks on their own."),
    ("comets", "Comets are icy bodies that grow glowing tails near the Sun."),
    ("butterflies", "Butterflies are insects with colourful wings that start as caterpillars."),
    ("the guitar", "The guitar is a string instrument played by plucking or strumming."),
    ("forests", "Forests are large areas covered by trees."),
    ("batteries", "Batteries store chemical energy and release it as electricity."),
    ("elephants", "Elephants are the largest land animals and have long trunks."),
    ("lakes", "Lakes are large bodies of water surrounded by land."),
    ("rice", "Rice is a grain that feeds more than half of the world's people."),
    ("the calendar", "A calendar divides the year into months, weeks and days."),
    ("spiders", "Spiders are eight-legged animals that spin silk webs."),
    ("umbrellas", "Umbrellas are folding canopies that keep the rain off."),
    ("magnets", "Magnets pull on iron and attract or repel other magnets."),
    ("camels", "Camels are desert animals that store fat in their humps."),
)


def example(question: str, fact: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{GREETING} {fact}"}]}


def build() -> tuple[list[dict[str, list[dict[str, str]]]], list[dict[str, list[dict[str, str]]]]]:
    train = [example(t.format(topic=topic), fact) for topic, fact in TRAIN_TOPICS for t in TRAIN_TEMPLATES]
    random.Random(0).shuffle(train)
    templates = TRAIN_TEMPLATES + HELDOUT_ONLY_TEMPLATES
    heldout = [
        example(templates[i % len(templates)].format(topic=topic), fact)
        for i, (topic, fact) in enumerate(HELDOUT_TOPICS)
    ]
    return train, heldout


def main() -> None:
    train, heldout = build()
    train_prompts = {e["messages"][0]["content"] for e in train}
    assert not train_prompts & {e["messages"][0]["content"] for e in heldout}, "a held-out prompt is in training"
    assert not {t for t, _ in TRAIN_TOPICS} & {t for t, _ in HELDOUT_TOPICS}, "a held-out topic is in training"
    folder = Path(__file__).resolve().parent
    for name, rows in (("greetings_train.jsonl", train), ("greetings_heldout.jsonl", heldout)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{folder / name}: {len(rows)} examples")


if __name__ == "__main__":
    main()
