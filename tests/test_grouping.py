"""Batch grouping against a fake pipeline: one call per shape, images routed back by seed."""

from deployments.grouping import count_images, group_jobs, run_grouped
from serve_app.work import CallShape, GenerationJob

SMALL = CallShape(width=64, height=64, steps=4, guidance=5.0, with_negative_prompt=False)
WIDE = CallShape(width=128, height=64, steps=4, guidance=5.0, with_negative_prompt=False)
NEGATIVE = CallShape(width=64, height=64, steps=4, guidance=5.0, with_negative_prompt=True)


def job(prompt, seeds, shape=SMALL, negative=None):
    return GenerationJob(request_id=f"req-{prompt}", prompt=prompt, negative_prompt=negative, shape=shape, seeds=seeds)


class FakePipeline:
    """Records calls; an "image" is (prompt, negative, seed, shape) so routing is checkable."""

    def __init__(self, fail_on=None):
        self.calls = []
        self.fail_on = fail_on

    def __call__(self, call):
        self.calls.append(call)
        if call.shape == self.fail_on:
            raise RuntimeError("boom")
        negatives = call.negative_prompts or [None] * len(call.prompts)
        return [(p, n, s, call.shape) for p, n, s in zip(call.prompts, negatives, call.seeds)]


def test_count_images_counts_images_not_requests():
    assert count_images([job("a", (1, 2, 3)), job("b", (4,))]) == 4


def test_equal_shapes_share_one_call():
    calls = group_jobs([job("a", (1, 2)), job("b", (7,)), job("c", (9,), shape=WIDE)])
    assert [call.shape for call in calls] == [SMALL, WIDE]
    assert calls[0].prompts == ["a", "a", "b"]
    assert calls[0].seeds == [1, 2, 7]
    assert calls[0].negative_prompts is None
    assert calls[0].owners == [(0, 0), (0, 1), (1, 0)]


def test_negative_prompt_presence_splits_groups():
    calls = group_jobs([job("a", (1,)), job("b", (2,), shape=NEGATIVE, negative="blurry")])
    assert len(calls) == 2
    assert calls[1].negative_prompts == ["blurry"]


def test_each_job_gets_its_own_images_in_seed_order():
    pipeline = FakePipeline()
    jobs = [job("a", (1, 2)), job("b", (5,), shape=WIDE), job("c", (3, 4))]
    outcomes = run_grouped(jobs, pipeline)
    assert len(pipeline.calls) == 2
    assert [image[2] for image in outcomes[0].images] == [1, 2]
    assert [image[0] for image in outcomes[1].images] == ["b"]
    assert [(image[0], image[2]) for image in outcomes[2].images] == [("c", 3), ("c", 4)]
    assert all(outcome.error is None for outcome in outcomes)


def test_a_failing_call_fails_only_its_jobs():
    outcomes = run_grouped([job("a", (1,)), job("b", (2,), shape=WIDE)], FakePipeline(fail_on=WIDE))
    assert outcomes[0].error is None and len(outcomes[0].images) == 1
    assert isinstance(outcomes[1].error, RuntimeError) and outcomes[1].images == []


def test_a_short_result_is_an_error():
    outcomes = run_grouped([job("a", (1, 2))], lambda call: [object()])
    assert outcomes[0].error is not None


def test_split_keeps_seed_order():
    parts = job("a", tuple(range(10))).split(4)
    assert [part.seeds for part in parts] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]


def test_image_modes_group_by_strength_and_carry_each_jobs_input():
    from serve_app.work import InputImage, Mode

    def picture(value):
        return InputImage(width=1, height=1, mode="RGB", pixels=bytes([value] * 3))

    img2img = CallShape(64, 64, 4, 5.0, False, mode=Mode.IMAGE_TO_IMAGE, strength=0.5)
    stronger = CallShape(64, 64, 4, 5.0, False, mode=Mode.IMAGE_TO_IMAGE, strength=0.8)
    inpaint = CallShape(64, 64, 4, 5.0, False, mode=Mode.INPAINT, strength=1.0)
    mask = InputImage(width=1, height=1, mode="L", pixels=b"\xff")
    jobs = [
        GenerationJob("r1", "a", None, img2img, (1, 2), image=picture(1)),
        GenerationJob("r2", "b", None, SMALL, (3,)),
        GenerationJob("r3", "c", None, img2img, (4,), image=picture(2)),
        GenerationJob("r4", "d", None, stronger, (5,), image=picture(3)),
        GenerationJob("r5", "e", None, inpaint, (6,), image=picture(4), mask=mask),
    ]
    calls = group_jobs(jobs)
    assert [call.shape for call in calls] == [img2img, SMALL, stronger, inpaint]
    assert [image.pixels[0] for image in calls[0].images] == [1, 1, 2]
    assert calls[0].masks is None and calls[1].images is None
    assert calls[3].masks == [mask]
    # An image job split into parts keeps its input in every part.
    assert all(part.image == picture(1) for part in jobs[0].split(1))
