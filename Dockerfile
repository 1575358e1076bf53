# GPU workers for Dataflow (QA with vLLM, the VQ-GAN), following Beam's recipe for vLLM images:
# a CUDA base, the Beam SDK's worker harness (/opt/apache/beam) copied from the Beam SDK image of the
# same version and Python, vLLM and lwm-data installed, and Beam's boot program as the entrypoint.
#
#   pip wheel --no-deps -w dist .
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/lwm-data-gpu:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/lwm-data-gpu:0.1.0
# then run jobs with --sdk_container_image=<that image> (README: "Running on Dataflow").
ARG BEAM_VERSION=2.77.0
ARG PYTHON_VERSION=3.11

FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION} AS beam

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG BEAM_VERSION
ARG PYTHON_VERSION
ARG VLLM_VERSION=0.32.0
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common curl ca-certificates \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python${PYTHON_VERSION} python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python${PYTHON_VERSION} -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The worker harness: its boot program starts the SDK worker inside this image.
COPY --from=beam /opt/apache/beam /opt/apache/beam

# vLLM pins the CUDA torch build it needs; lwm-data's extras add the VQ-GAN and media decoders.
RUN pip install --upgrade pip \
 && pip install "apache-beam[gcp]==${BEAM_VERSION}" "vllm==${VLLM_VERSION}"
COPY dist/*.whl /tmp/wheels/
RUN pip install "$(ls /tmp/wheels/lwm_data-*.whl)[qa,vision,gcp]" && rm -rf /tmp/wheels

ENTRYPOINT ["/opt/apache/beam/boot"]
