"""
Generate text from a trained checkpoint (with the KV cache), in the tokenizer it was trained with.

    python sample.py --ckpt out/last.pt --prompt "What is the pass key?" --num-samples 3
"""
import torch

from model import load_checkpoint
from common.settings import Parser, fail, flag_type, pick_device, run_main
from data.shards import tokenizer_from_meta


def parse_args(argv):
    p = Parser(prog="sample.py", description=__doc__)
    p.add_argument("--ckpt", default="out/last.pt", help="checkpoint written by train.py (default: out/last.pt)")
    p.add_argument("--prompt", default=None, help="prompt text (default: an end-of-text token, i.e. unconditional)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file instead")
    p.add_argument("--num-samples", type=flag_type(int, "[1, inf)"), default=2, help="how many samples to draw (default: 2)")
    p.add_argument("--max-new-tokens", type=flag_type(int, "[1, inf)"), default=200,
                   help="tokens to generate per sample (default: 200)")
    p.add_argument("--temperature", type=flag_type(float, "[0, inf)"), default=0.8,
                   help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=flag_type(int, "[0, inf)"), default=50,
                   help="sample only among the k most likely tokens; 0 = all (default: 50)")
    p.add_argument("--seed", type=flag_type(int, "[0, inf)"), default=1337, help="random seed (default: 1337)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow; for checking)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    try:
        model, checkpoint = load_checkpoint(args.ckpt, device)
        enc = tokenizer_from_meta(checkpoint["meta"])
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(str(e))
    model.eval()
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read --prompt-file {args.prompt_file}: {getattr(e, 'strerror', None) or e}")
    else:
        prompt = args.prompt
    ids = enc.encode_ordinary(prompt) if prompt else [enc.eot_token]
    if not ids:
        fail("the prompt is empty; give some text or leave --prompt out")
    if max(ids) >= model.config.vocab_size:
        fail(f"the prompt has token ids beyond the model's vocabulary ({model.config.vocab_size})")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                             use_cache=not args.no_cache, generator=generator)
        text = enc.decode(out[0].tolist()).replace("<|endoftext|>", "\n<|endoftext|>\n")
        print(f"--- sample {i + 1} ---")
        print(text)


if __name__ == "__main__":
    run_main(main)
