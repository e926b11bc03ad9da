"""A Gradio demo: chat with streamed tokens, novel continuation (with retrieved earlier passages), and a blind A/B
human evaluation whose ratings go to SQLite.

    python web_demo.py --model_path <model> [--lora_model <adapter>]
    python web_demo.py --lora_model output/lora --model_b_path "" --lora_model_b "" --retrieval_index output/embedding

Tabs open directly with ?tab=chat|novel|eval. Binds 127.0.0.1; --share asks Gradio for a public link.
"""

import argparse
import queue
import random
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared package next to this script
# novelkit before torch / transformers / peft: it checks their versions and quiets their import-time noise

from novelkit.data.formats import Sample, load_samples
from novelkit.data.readers import read_text
from novelkit.data.templates import default_template_name, encode_prompt, get_template, stop_token_ids
from novelkit.errors import ConfigError, exit_on_error
from novelkit.evaluation.ratings import AXES, SUMMARY_HEADERS, Rating, RatingStore
from novelkit.generation.batch import generation_kwargs
from novelkit.generation.worker import engine_for, stream_generate
from novelkit.models.loading import adapter_base_path, load_model, load_tokenizer, max_positions
from novelkit.retrieval.recap import Retriever, recap_for

import gradio as gr

PLAIN = get_template("plain")  # continuation: the story text as it is
TABS = ("chat", "novel", "eval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_path", default="", help="model folder; empty = the adapter's base, else the default")
    p.add_argument("--lora_model", default="", help="PEFT adapter folder; empty = the model alone")
    p.add_argument("--model_b_path", default="", help="evaluation: model B's folder (same rules as --model_path)")
    p.add_argument("--lora_model_b", default="", help="evaluation: model B's adapter; with neither B flag, B is A "
                                                          "(two sampled outputs of it, to rate before DPO)")
    p.add_argument("--template", default="", help="chat template; empty = the model's own")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max_new_tokens", type=int, default=512, help="the slider's start value and the evaluation's")
    p.add_argument("--retrieval_index", default="", help="Embedding index folder: continuation shows and uses "
                                                         "retrieved earlier passages")
    p.add_argument("--retrieval_k", type=int, default=4)
    p.add_argument("--recap_tokens", type=int, default=512, help="token budget of the retrieved 前情提要 block")
    p.add_argument("--eval_prompts", default="data_examples/sft/dev.jsonl", help="evaluation prompts, any format")
    p.add_argument("--ratings_db", default="output/web_demo/ratings.sqlite")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public gradio.live link (off by default)")
    return p.parse_args(argv)


class LoadedModel:
    """A model, its tokenizer and template; generation streams text and holds the lock, because Gradio runs
    handlers on several threads and generate is not safe to run twice at once on one model."""

    def __init__(self, model_path, lora, template, dtype):
        model_path = model_path or (adapter_base_path(lora) if lora else "")
        self.name = Path(lora or model_path or "default").name
        self.model = load_model(model_path, dtype=dtype, adapter=lora or None)
        self.tokenizer = load_tokenizer(model_path)
        self.template = get_template(template or default_template_name(self.tokenizer, self.model.config))
        self.context = max_positions(self.model.config)
        self.lock = threading.Lock()
        engine_for(self.model, self.tokenizer).warm_up()  # the first visitor would wait for the compilation

    def stream(self, sample: Sample, chat=True, **gen):
        """Yields the response so far, each time more of it is final."""
        template = self.template if chat else PLAIN
        gen = generation_kwargs(self.model, **gen)
        gen["max_new_tokens"] = min(gen.get("max_new_tokens") or 512, self.context // 2)
        prompt = encode_prompt(self.tokenizer, template, sample)[-(self.context - gen["max_new_tokens"]):]
        pieces, done, cancelled = queue.Queue(), object(), threading.Event()

        def run():
            try:
                with self.lock:
                    stream_generate(self.model, self.tokenizer, prompt, stop_ids=stop_token_ids(self.tokenizer,
                                    template), on_text=pieces.put, cancelled=cancelled.is_set, **gen)
            except Exception as e:  # reported to the user, not lost in the thread
                pieces.put(e)
            pieces.put(done)

        threading.Thread(target=run, daemon=True).start()
        text = ""
        try:
            while (piece := pieces.get()) is not done:
                if isinstance(piece, Exception):
                    raise gr.Error(f"generation failed: {type(piece).__name__}: {piece}")
                text += piece
                yield text
        finally:
            cancelled.set()  # the browser left or the user pressed stop

    def complete(self, sample: Sample, **gen) -> str:
        text = ""
        for text in self.stream(sample, **gen):
            pass
        return text


def sampling_controls(max_new_tokens):
    return [gr.Slider(0, 2, value=0.3, step=0.05, label="temperature (0 = greedy)"),
            gr.Slider(0.05, 1, value=0.85, step=0.05, label="top_p"),
            gr.Slider(0, 100, value=5, step=1, label="top_k (0 = off)"),
            gr.Slider(1, 2, value=1.1, step=0.01, label="repetition penalty"),
            gr.Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1, label="max new tokens")]


def sampling(temperature, top_p, top_k, repetition_penalty, max_new_tokens) -> dict:
    return dict(do_sample=temperature > 0, temperature=temperature, top_p=top_p, top_k=int(top_k) or None,
                repetition_penalty=repetition_penalty, max_new_tokens=int(max_new_tokens))


def message_text(content) -> str:
    """A chat message's text: Gradio gives a string or a list of content parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p if isinstance(p, str) else p.get("text", "") for p in parts if isinstance(p, (str, dict)))


def build_demo(args, model_a: LoadedModel, model_b: LoadedModel, retriever, prompts, store: RatingStore):
    names = (model_a.name, model_b.name)
    if names[0] == names[1]:
        names = (f"{names[0]} (A)", f"{names[1]} (B)")

    def chat(message, history, system, multi_turn, temperature, top_p, top_k, repetition_penalty, max_new_tokens):
        turns, user = [], None
        for m in history if multi_turn else []:
            if m["role"] == "user":
                user = message_text(m["content"])
            elif m["role"] == "assistant" and user is not None:
                turns.append((user, message_text(m["content"])))
                user = None
        controls = temperature, top_p, top_k, repetition_penalty, max_new_tokens
        yield from model_a.stream(Sample(message, "", system, turns), **sampling(*controls))

    def continue_story(story, temperature, top_p, top_k, repetition_penalty, max_new_tokens):
        if not story.strip():
            raise gr.Error("先粘贴或上传前文")
        recap = recap_for(retriever, story, model_a.tokenizer, k=args.retrieval_k,
                          token_budget=args.recap_tokens) if retriever else ""
        shown = recap or ("（未检索到相关前文）" if retriever else "（未指定 --retrieval_index，不检索）")
        controls = temperature, top_p, top_k, repetition_penalty, max_new_tokens
        for text in model_a.stream(Sample(recap + story, ""), chat=False, **sampling(*controls)):
            yield text, shown

    def load_story(path):
        return read_text(path) if path else gr.skip()

    def next_pair(position):
        """The next prompt's two outputs, shown in random order; which model is which stays on the server."""
        sample = prompts[position % len(prompts)]
        # one model on both sides (the first round of ratings, before any preference tuning): two samples of it,
        # which differ; two models: each its own generation settings
        gen = dict(do_sample=True, temperature=0.8, top_p=0.9) if model_b is model_a else {}
        outputs = [m.complete(sample, max_new_tokens=args.max_new_tokens, **gen) for m in (model_a, model_b)]
        order = random.sample([0, 1], 2)
        pair = {"prompt": sample.prompt, "outputs": [outputs[i] for i in order], "models": [names[i] for i in order]}
        return sample.prompt, pair["outputs"][0], pair["outputs"][1], pair, position + 1

    def submit_rating(rater, logic_a, knowledge_a, style_a, logic_b, knowledge_b, style_b, winner, pair):
        if not pair:
            raise gr.Error("先点「下一题」生成一对回答")
        if not rater.strip():
            raise gr.Error("请填写评分人")
        store.add(Rating(rater, pair["prompt"], *pair["outputs"], *pair["models"],
                         (logic_a, knowledge_a, style_a), (logic_b, knowledge_b, style_b), winner))
        status = f"已保存。A 是 {pair['models'][0]}，B 是 {pair['models'][1]}。"
        return status, store.summary(), None

    def summary():
        return store.summary()

    def export_csv():
        return str(store.export_csv(Path(tempfile.mkdtemp()) / "ratings.csv"))

    def select_tab(request: gr.Request):
        tab = request.query_params.get("tab", "chat")
        return gr.Tabs(selected=tab if tab in TABS else "chat")

    with gr.Blocks(title="NovelKit 网文模型演示", analytics_enabled=False) as demo:
        template = getattr(model_a.template, "name", model_a.template)
        gr.Markdown(f"## NovelKit 网文模型演示\n模型 `{model_a.name}`，对话模板 `{template}`")
        with gr.Tabs() as tabs:
            with gr.Tab("对话", id="chat"):
                with gr.Accordion("设置", open=False):
                    system = gr.Textbox(label="系统提示（system prompt）")
                    multi_turn = gr.Checkbox(False, label="多轮对话（默认单轮：每次只发当前这句）")
                    chat_controls = sampling_controls(args.max_new_tokens)
                gr.ChatInterface(chat, additional_inputs=[system, multi_turn, *chat_controls],
                                 analytics_enabled=False)
            with gr.Tab("小说续写", id="novel"):
                with gr.Row():
                    with gr.Column():
                        story = gr.Textbox(label="前文（粘贴，或上传 .txt）", lines=14)
                        upload = gr.File(label="上传前文", file_types=[".txt"], type="filepath")
                        with gr.Accordion("生成参数", open=False):
                            novel_controls = sampling_controls(args.max_new_tokens)
                        go = gr.Button("续写", variant="primary")
                    with gr.Column():
                        continuation = gr.Textbox(label="续写", lines=14)
                        passages = gr.Textbox(label="检索到的前文（前情提要，已加入提示）", lines=8)
                upload.upload(load_story, upload, story)
                go.click(continue_story, [story, *novel_controls], [continuation, passages])
            with gr.Tab("人工评测", id="eval"):
                gr.Markdown(f"盲评：两个模型的回答随机排成 A、B；评分后揭晓。题目来自 `{args.eval_prompts}`"
                            f"（{len(prompts)} 条），评分存于 `{args.ratings_db}`。")
                pair, position = gr.State(None), gr.State(0)
                with gr.Row():
                    rater = gr.Textbox(label="评分人")
                    next_btn = gr.Button("下一题", variant="primary")
                prompt_box = gr.Textbox(label="题目", lines=3)
                with gr.Row():
                    out_a, out_b = gr.Textbox(label="回答 A", lines=10), gr.Textbox(label="回答 B", lines=10)
                with gr.Row():
                    scores_a = [gr.Slider(1, 5, value=3, step=1, label=f"A · {axis}") for axis in AXES]
                    scores_b = [gr.Slider(1, 5, value=3, step=1, label=f"B · {axis}") for axis in AXES]
                winner = gr.Radio(["A", "B", "tie"], value="tie", label="哪个更好")
                submit = gr.Button("提交评分", variant="primary")
                status = gr.Markdown()
                table = gr.Dataframe(headers=SUMMARY_HEADERS, value=store.summary(), label="汇总（按模型）")
                with gr.Row():
                    refresh, export = gr.Button("刷新汇总"), gr.Button("导出 CSV")
                csv_file = gr.File(label="CSV")
                next_btn.click(next_pair, position, [prompt_box, out_a, out_b, pair, position])
                submit.click(submit_rating, [rater, *scores_a, *scores_b, winner, pair], [status, table, pair])
                refresh.click(summary, None, table)
                export.click(export_csv, None, csv_file)
        demo.load(select_tab, None, tabs)
    return demo


@exit_on_error
def main(argv=None):
    args = parse_args(argv)
    model_a = LoadedModel(args.model_path, args.lora_model, args.template, args.dtype)
    model_b = (LoadedModel(args.model_b_path, args.lora_model_b, args.template, args.dtype)
               if args.model_b_path or args.lora_model_b else model_a)
    retriever = Retriever(args.retrieval_index) if args.retrieval_index else None
    prompts = load_samples(args.eval_prompts)
    if not prompts:
        raise ConfigError(f"{args.eval_prompts}: no evaluation prompts")
    demo = build_demo(args, model_a, model_b, retriever, prompts, RatingStore(args.ratings_db))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False)


if __name__ == "__main__":
    main()
