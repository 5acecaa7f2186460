# EfficientSAM Label Studio ML backend and its Redis/RQ workers: one image, the command picks the
# role (`python -m backend`, `python -m worker ...`; see docker-compose.yml).
#
# GPU image (default): PyPI's Linux x86_64 torch wheels are CUDA builds (they pull the nvidia-*
# runtime wheels, a few GB; the host needs an NVIDIA driver recent enough for that CUDA).
#   docker build -t efficientsam-ls-backend .
# Small CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     -t efficientsam-ls-backend .
# TORCH_VERSION must satisfy the project's pin (torch>=2.4,<2.14); 2.13.0 is what CI tests.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# torch in a layer of its own: the largest download and the least often changed. No torchvision.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's other dependencies (with the `lora` extra, for TRAIN_LORA_RANK > 0), also cached
# across code changes: install pyproject.toml with empty packages, then drop that stub (torch is
# already there and satisfies the pin).
COPY pyproject.toml README.md /src/
RUN mkdir -p /src/efficientsam /src/backend /src/worker \
    && touch /src/efficientsam/__init__.py /src/backend/__init__.py /src/worker/__init__.py \
    && pip install "/src[lora]" \
    && pip uninstall -y efficientsam-ls-backend \
    && rm -rf /src/efficientsam /src/backend /src/worker /src/build /src/*.egg-info

# The project itself, non-editable; the sources do not stay in the image.
COPY efficientsam /src/efficientsam
COPY serving /src/serving
COPY backend /src/backend
COPY worker /src/worker
RUN pip install --no-deps /src && rm -rf /src

# Non-root. /models is where the checkpoint and the fine-tuned versions live (a volume in
# docker-compose.yml; the train worker writes there as uid 1000).
RUN useradd --create-home --uid 1000 --user-group app \
    && mkdir -p /app /models \
    && chown app:app /app /models
USER app
WORKDIR /app
ENV MODEL_DIR=/models

EXPOSE 9090
CMD ["python", "-m", "backend"]
