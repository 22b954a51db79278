"""Object detection under corruption (Michaelis et al. 2019): COCO / Pascal VOC data, torchvision
detectors, COCO AP from pycocotools, and the demo detector."""
